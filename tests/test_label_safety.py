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


def _lose_labels(tmp_path, damage: str):
    """One ingested experience, then its labels.json deleted or emptied; returns the file's path."""
    _ingest_one_experience(tmp_path)
    path = tmp_path / "labels.json"
    if damage == "delete":
        path.unlink()
    else:
        path.write_text('{"names": []}')
    return path


@pytest.mark.parametrize("damage", ["delete", "empty"])
def test_a_lost_labels_json_refuses_the_start_when_experiences_hold_labels(tmp_path, damage):
    path = _lose_labels(tmp_path, damage)
    with pytest.raises(CLAgentError) as refused:
        make_service(tmp_path).start()
    message = str(refused.value)
    assert "labels.json" in message and "experience 0" in message
    assert "backup" in message and "cl-agent labels restore" in message and "class_names" in message
    assert not path.exists() or json.loads(path.read_text()) == {"names": []}  # nothing written over it


def test_a_lost_labels_json_refuses_the_start_when_the_open_experience_holds_labels(tmp_path):
    with make_service(tmp_path) as service:
        client = LabeledClient(service.endpoints["labeled"], "robot")
        assert client.send(images(2), ["circle", "square"], encoding="png").ok  # acked, not cut yet
        client.close()
    (tmp_path / "labels.json").unlink()
    with pytest.raises(CLAgentError, match="labels.json is missing, but the open experience 0 holds 2 labeled"):
        make_service(tmp_path).start()
    from cl_agent.labels import highest_stored_class_id

    assert highest_stored_class_id(tmp_path) == 1  # read from the open spool segment


@pytest.mark.parametrize("order", [("circle", "square"), ("square", "circle")])
@pytest.mark.parametrize("damage", ["delete", "empty"])
def test_spool_classes_do_not_stand_in_for_a_lost_labels_json(tmp_path, damage, order):
    """spool.classes fills the map when labels.json is missing, in its own order (maybe not the trained one):
    a lost labels.json is refused all the same, and nothing is written over it."""
    path = _lose_labels(tmp_path, damage)
    with pytest.raises(CLAgentError) as refused:
        make_service(tmp_path, spool={"classes": list(order)}).start()
    message = str(refused.value)
    assert "labels.json" in message and "experience 0 holds labeled samples" in message
    assert "spool.classes does not stand in for it" in message and "cl-agent labels restore" in message
    assert not path.exists() or json.loads(path.read_text()) == {"names": []}  # nothing written over it


def test_spool_classes_in_another_order_than_labels_json_are_refused_at_the_ingest_start(tmp_path):
    _ingest_one_experience(tmp_path)
    with pytest.raises(CLAgentError, match=r"names class 0 'circle', but spool.classes names it 'square'"):
        make_service(tmp_path, spool={"classes": ["square", "circle"]}).start()
    assert json.loads((tmp_path / "labels.json").read_text()) == {"names": ["circle", "square"]}
    with make_service(tmp_path, spool={"classes": ["circle", "square", "star"]}) as service:  # the same order: starts
        assert service.labels.ids_for(["star", "circle"]) == [2, 0]


def test_a_fresh_workdir_with_spool_classes_starts_without_labels_json(tmp_path):
    with make_service(tmp_path, spool={"classes": ["square", "circle"]}) as service:
        assert service.labels.names == ["square", "circle"] and not (tmp_path / "labels.json").exists()


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


def _publish(tmp_path, class_names) -> None:
    from cl_agent.repository import ModelRepository

    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read here")
    ModelRepository(tmp_path / "models", "student").publish(
        model, {"class_names": class_names, "image_size": 16, "experience_index": 0}
    )


def _restore(*args: str):
    from typer.testing import CliRunner

    from cl_agent.cli import app

    return CliRunner().invoke(app, ["labels", "restore", *args])


def test_labels_restore_rebuilds_the_map_from_the_newest_manifest_and_the_start_succeeds(tmp_path):
    workdir = tmp_path / "agent"
    _ingest_one_experience(workdir, labels=("circle", "square", "circle"))
    (workdir / "labels.json").unlink()
    _publish(tmp_path, ["circle", "square", "2", "3"])  # outputs 2 and 3 unused yet: placeholders
    result = _restore("--workdir", str(workdir), "--repo", str(tmp_path / "models"))
    assert result.exit_code == 0, result.output
    assert "2 class names from version 1" in result.output
    assert json.loads((workdir / "labels.json").read_text()) == {"names": ["circle", "square"]}
    with make_service(workdir) as service:
        assert service.labels.ids_for(["square", "triangle"]) == [1, 2]

    again = _restore("--workdir", str(workdir), "--repo", str(tmp_path / "models"))
    assert again.exit_code == 2 and "already holds 3 class names" in again.output


def test_labels_restore_names_classes_added_after_the_version_by_their_ids(tmp_path):
    workdir = tmp_path / "agent"
    _ingest_one_experience(workdir, labels=("circle", "square", "star"))
    (workdir / "labels.json").unlink()
    _publish(tmp_path, ["circle", "square", "2"])  # published before "star" arrived
    result = _restore("--workdir", str(workdir), "--repo", str(tmp_path / "models"))
    assert result.exit_code == 0, result.output
    assert "ids 2..2 were added after it was published" in result.output
    assert json.loads((workdir / "labels.json").read_text()) == {"names": ["circle", "square", "2"]}


def test_labels_restore_without_versions_says_to_use_a_backup(tmp_path):
    (tmp_path / "models").mkdir()
    result = _restore("--workdir", str(tmp_path), "--repo", str(tmp_path / "models"))
    assert result.exit_code == 2 and "backup" in result.output


def test_an_older_labels_json_than_the_stored_samples_refuses_the_start(tmp_path):
    _ingest_one_experience(tmp_path, labels=("circle", "square"))  # experience 0, untrained
    older = (tmp_path / "labels.json").read_text()
    with make_service(tmp_path) as service:
        client = LabeledClient(service.endpoints["labeled"], "robot")
        assert client.send(images(1), ["star"], encoding="png").ok  # class 2, in the open experience 1
        client.close()
    (tmp_path / "labels.json").write_text(older)
    with pytest.raises(CLAgentError, match=r"holds 2 class names, but the open experience 1 holds samples of class id 2"):
        make_service(tmp_path).start()
    assert (tmp_path / "labels.json").read_text() == older  # nothing written over it

    (tmp_path / "labels.json").write_text(json.dumps({"names": ["circle"]}))
    with pytest.raises(CLAgentError, match=r"holds 1 class names, but the open experience 1 holds samples of class id 2"):
        make_service(tmp_path).start()
    (tmp_path / "labels.json").write_text(json.dumps({"names": ["circle", "square", "star"]}))
    with make_service(tmp_path) as service:  # the right copy back: starts
        assert service.labels.ids_for(["star"]) == [2]


def test_an_older_labels_json_is_found_in_a_cut_untrained_experience(tmp_path):
    _ingest_one_experience(tmp_path, labels=("circle", "square"))
    (tmp_path / "labels.json").write_text(json.dumps({"names": ["circle"]}))
    with pytest.raises(CLAgentError, match=r"holds 1 class names, but experience 0 holds samples of class id 1"):
        make_service(tmp_path).start()


def test_an_id_whose_placeholder_names_another_class_is_refused(tmp_path):
    labels = LabelMap(tmp_path / "labels.json", max_classes=10)
    assert labels.ids_for(["a", "b", "3"]) == [0, 1, 2]
    with pytest.raises(LabelError) as info:
        labels.ids_for([3])  # its placeholder '3' already names class 2
    assert info.value.reason == "bad_class_id" and "'3'" in info.value.detail and "class 2" in info.value.detail
    assert labels.names == ["a", "b", "3"] == LabelMap(tmp_path / "labels.json", 10).names
    assert labels.ids_for([2, "3", "c"]) == [2, 2, 3]  # ids within the map, and names, still work
    assert labels.ids_for([5]) == [5] and labels.names == ["a", "b", "3", "c", "4", "5"]


def test_a_failed_labels_json_write_leaves_the_map_unchanged(tmp_path, monkeypatch):
    labels = LabelMap(tmp_path / "labels.json", max_classes=10)
    assert labels.ids_for(["a"]) == [0]

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("cl_agent.labels.atomic_write_text", no_space)
    for new in (["b"], [4]):
        with pytest.raises(OSError):
            labels.ids_for(new)
        assert labels.names == ["a"]
    monkeypatch.undo()
    assert labels.ids_for(["c"]) == [1] and LabelMap(tmp_path / "labels.json", 10).names == ["a", "c"]


def test_a_plan_changes_nothing_until_applied(tmp_path):
    labels = LabelMap(tmp_path / "labels.json", max_classes=10)
    plan = labels.plan(["a", 2])
    assert plan.ids == [3, 2] and labels.names == [] and not (tmp_path / "labels.json").exists()
    labels.apply(plan)
    assert labels.names == ["0", "1", "2", "a"] == LabelMap(tmp_path / "labels.json", 10).names
