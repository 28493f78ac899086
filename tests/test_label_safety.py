"""The class-name map cannot be lost or silently split: a lost labels.json stops the start, near-duplicate names warn."""

import json
import logging

import pytest

from cl_agent.client import LabeledClient
from cl_agent.errors import CLAgentError
from cl_agent.labels import LabelError, LabelMap
from ingest_support import images, make_service


def _ingest_one_experience(workdir, labels=("circle", "square")) -> None:
    with make_service(workdir) as service:
        client = LabeledClient(service.endpoints["labeled"], "robot")
        assert client.send(images(len(labels)), list(labels), encoding="png").ok
        client.close()
        assert service.end_experience() == 0


@pytest.mark.parametrize("damage", ["delete", "empty"])
def test_a_lost_labels_json_refuses_the_start_when_experiences_hold_labels(tmp_path, damage):
    _ingest_one_experience(tmp_path)
    path = tmp_path / "labels.json"
    if damage == "delete":
        path.unlink()
    else:
        path.write_text('{"names": []}')
    with pytest.raises(CLAgentError) as refused:
        make_service(tmp_path).start()
    message = str(refused.value)
    assert "labels.json" in message and "experience 0" in message
    assert "backup" in message and "cl-agent models show" in message and "class_names" in message
    assert not path.exists() or json.loads(path.read_text()) == {"names": []}  # nothing written over it


def test_a_lost_labels_json_refuses_the_start_when_the_open_experience_holds_labels(tmp_path):
    with make_service(tmp_path) as service:
        client = LabeledClient(service.endpoints["labeled"], "robot")
        assert client.send(images(2), ["circle", "square"], encoding="png").ok  # acked, not cut yet
        client.close()
    (tmp_path / "labels.json").unlink()
    with pytest.raises(CLAgentError, match="labels.json is missing, but the open experience 0 holds 2 labeled"):
        make_service(tmp_path).start()


def test_restored_labels_json_starts_and_keeps_the_ids(tmp_path):
    _ingest_one_experience(tmp_path)
    (tmp_path / "labels.json").write_text(json.dumps({"names": ["circle", "square"]}))
    with make_service(tmp_path) as service:
        assert service.labels.ids_for(["square", "triangle"]) == [1, 2]


def test_a_fresh_workdir_starts_without_labels_json(tmp_path):
    with make_service(tmp_path) as service:
        assert len(service.labels) == 0


def test_too_many_classes_names_the_config_keys(tmp_path):
    labels = LabelMap(tmp_path / "labels.json", max_classes=2)
    labels.ids_for(["a", "b"])
    with pytest.raises(LabelError) as refused:
        labels.ids_for(["c"])
    assert "spool.max_classes" in refused.value.detail and "model.num_classes" in refused.value.detail
    with pytest.raises(LabelError) as refused:
        LabelMap(tmp_path / "other.json", max_classes=2).ids_for([5, "x"])
    assert "spool.max_classes" in refused.value.detail


def test_names_differing_only_in_case_are_kept_apart_with_one_warning_each(tmp_path, caplog):
    labels = LabelMap(tmp_path / "labels.json", max_classes=10)
    with caplog.at_level(logging.WARNING, logger="cl_agent.labels"):
        assert labels.ids_for(["Circle", "square"]) == [0, 1]
        assert caplog.records == []
        assert labels.ids_for(["CIRCLE", "circle", "CIRCLE"]) == [2, 3, 2]
        assert labels.ids_for(["circle", "CIRCLE", "Circle"]) == [3, 2, 0]  # known now: no new warning
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2, warnings
    assert "'CIRCLE'" in warnings[0] and "'Circle'" in warnings[0]
    assert "'circle'" in warnings[1] and "'Circle'" in warnings[1]
    assert LabelMap(tmp_path / "labels.json", 10).names == ["Circle", "square", "CIRCLE", "circle"]
