"""Label names can be listed, fixed in advance and corrected: `labels list`, spool.classes, `labels rename`."""

import fcntl
import json

import pytest
from typer.testing import CliRunner

from cl_agent.cli import app
from cl_agent.client import LabeledClient
from cl_agent.config import ConfigError, WireSection, load_config
from cl_agent.errors import CLAgentError
from cl_agent.experience import ExperienceStore
from cl_agent.ingest import COUNTER_NAMES
from cl_agent.intake import Counters, LabeledIntake
from cl_agent.labels import LabelError, LabelMap
from cl_agent.spool import Spool
from cl_agent.wire import encode_message
from ingest_support import images, make_service


def _labels(*args: str):
    return CliRunner().invoke(app, ["labels", *args])


def _send(service, labels) -> None:
    client = LabeledClient(service.endpoints["labeled"], "robot")
    assert client.send(images(len(labels)), list(labels), encoding="png").ok
    client.close()


def _names(workdir) -> list[str]:
    return json.loads((workdir / "labels.json").read_text())["names"]


# --------------------------------------------------------------------------- labels list


def test_labels_list_names_every_class_and_where_its_samples_are(tmp_path):
    with make_service(tmp_path) as service:
        _send(service, ["pallet", "box"])
        assert service.end_experience() == 0
        _send(service, ["Pallet"])  # a case variant: a class of its own, in the open experience 1
        assert service.end_experience() == 1
        _send(service, ["box"])  # open experience 2
    ExperienceStore(tmp_path).mark_trained(0)

    result = _labels("list", "--workdir", str(tmp_path), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["classes"]
    assert [(r["id"], r["name"]) for r in rows] == [(0, "pallet"), (1, "box"), (2, "Pallet")]
    assert rows[0]["experiences"] == [0] and rows[0]["trained"] == [0] and not rows[0]["open"]
    assert rows[1]["experiences"] == [0] and rows[1]["trained"] == [0] and rows[1]["open"]
    assert rows[2]["experiences"] == [1] and rows[2]["trained"] == []

    text = _labels("list", "--workdir", str(tmp_path))
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert lines[1].split() == ["0", "'pallet'", "1", "(1)"]
    assert lines[2].split() == ["1", "'box'", "1", "(1)", "+", "the", "open", "one"]
    assert lines[3].split() == ["2", "'Pallet'", "1", "(0)"]


def test_labels_list_reads_the_workdir_from_the_config(tmp_path):
    workdir = tmp_path / "agent"
    workdir.mkdir()
    (workdir / "labels.json").write_text(json.dumps({"names": ["pallet"]}))
    config = tmp_path / "agent.yaml"
    config.write_text(f"agent:\n  workdir: {workdir}\n")
    result = _labels("list", "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "'pallet'" in result.output and "no samples stored" in result.output


# --------------------------------------------------------------------------- labels rename


def test_rename_keeps_the_id_and_later_batches_go_to_it(tmp_path):
    with make_service(tmp_path) as service:
        _send(service, ["pallet", "Pallet", "box"])  # "Pallet" a typo: class 1
    result = _labels("rename", "Pallet", "crate", "--workdir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "renamed class 1 'Pallet' to 'crate'" in result.output
    assert _names(tmp_path) == ["pallet", "crate", "box"]
    with make_service(tmp_path) as service:
        assert service.labels.ids_for(["crate", "box"]) == [1, 2]


def test_rename_refuses_a_name_already_there_and_an_unknown_one(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"names": ["pallet", "Pallet", "box"]}))
    taken = _labels("rename", "Pallet", "box", "--workdir", str(tmp_path))
    assert taken.exit_code == 2 and "already has a class 'box' (class 2)" in taken.output
    unknown = _labels("rename", "palet", "crate", "--workdir", str(tmp_path))
    assert unknown.exit_code == 2 and "no class 'palet'" in unknown.output and "did you mean 'pallet'?" in unknown.output
    blank = _labels("rename", "Pallet", " crate", "--workdir", str(tmp_path))
    assert blank.exit_code == 2 and "whitespace" in blank.output
    assert _names(tmp_path) == ["pallet", "Pallet", "box"]


def test_rename_is_refused_while_an_agent_holds_the_workdir(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"names": ["pallet", "Pallet"]}))
    with open(tmp_path / "agent.lock", "a+") as held:  # what a running agent holds
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = _labels("rename", "Pallet", "crate", "--workdir", str(tmp_path))
    assert result.exit_code == 75 and "running in" in result.output and "stop it first" in result.output
    assert _names(tmp_path) == ["pallet", "Pallet"]
    assert _labels("rename", "Pallet", "crate", "--workdir", str(tmp_path)).exit_code == 0  # stopped: done


def test_rename_with_a_config_naming_the_class_in_spool_classes_must_match_it(tmp_path):
    """A rename the config's spool.classes contradicts would stop the next start: refused until the config has it."""
    workdir = tmp_path / "agent"
    workdir.mkdir()
    (workdir / "labels.json").write_text(json.dumps({"names": ["compass", "lion"]}))
    config = tmp_path / "robot.yaml"
    config.write_text(f"agent:\n  workdir: {workdir}\nspool:\n  classes: [compass, lion]\n")
    refused = _labels("rename", "compass", "magnetic_compass", "--config", str(config))
    assert refused.exit_code == 2, refused.output
    assert "spool.classes of the config names class 0 'compass'" in refused.output
    assert "Change spool.classes in the config too (class 0: 'magnetic_compass')" in refused.output
    assert _names(workdir) == ["compass", "lion"]
    overridden = _labels("rename", "compass", "magnetic_compass", "--set", f"agent.workdir={workdir}",
                         "--set", "spool.classes=[compass, lion, tiger]")
    assert overridden.exit_code == 2 and "names class 0 'compass'" in overridden.output
    # the config changed first: renamed, and the agent's map matches spool.classes
    config.write_text(f"agent:\n  workdir: {workdir}\nspool:\n  classes: [magnetic_compass, lion]\n")
    done = _labels("rename", "compass", "magnetic_compass", "--config", str(config))
    assert done.exit_code == 0, done.output
    assert _names(workdir) == ["magnetic_compass", "lion"]
    LabelMap(workdir / "labels.json", 10, ["magnetic_compass", "lion"])  # what the next start reads: accepted
    # without a config, as before: labels.json alone
    assert _labels("rename", "lion", "panthera", "--workdir", str(workdir)).exit_code == 0
    assert _names(workdir) == ["magnetic_compass", "panthera"]


# --------------------------------------------------------------------------- a fixed class set


def _intake(tmp_path, classes):
    labels = LabelMap(tmp_path / "labels.json", 10, classes)
    return LabeledIntake(Spool(tmp_path / "spool", 0, 10**9), labels, WireSection(), Counters(COUNTER_NAMES), lambda: 0)


def test_a_fixed_class_set_refuses_other_names_naming_the_closest(tmp_path):
    intake = _intake(tmp_path, ["pallet", "box", "person"])
    bodies = [
        encode_message("labeled", "s", 0, images(1), labels=["Pallet"]),
        encode_message("labeled", "s", 1, images(1), labels=["weird_cls"]),
        encode_message("labeled", "s", 2, images(2), labels=["person", "persn"]),
        encode_message("labeled", "s", 3, images(1), labels=[3]),
        encode_message("labeled", "s", 4, images(2), labels=["person", "box"]),
    ]
    answers = [json.loads(a[0]) for a in intake.process(bodies)]
    assert [a["kind"] for a in answers] == ["nack"] * 4 + ["ack"]
    assert answers[0]["reason"] == "bad_label" and "did you mean 'pallet'?" in answers[0]["detail"]
    assert "allowed: 'pallet', 'box', 'person'" in answers[1]["detail"] and "spool.classes" in answers[1]["detail"]
    assert "did you mean 'person'?" in answers[2]["detail"]  # refused whole
    assert answers[3]["reason"] == "bad_class_id" and "spool.classes" in answers[3]["detail"]
    assert intake.labels.ids_for(["person", "box"]) == [2, 1]  # ids in the configured order
    assert _names(tmp_path) == ["pallet", "box", "person"]


def test_a_fixed_class_set_writes_labels_json_with_the_first_sample_not_at_start(tmp_path):
    labels = LabelMap(tmp_path / "labels.json", 10, ["pallet", "box"])
    assert labels.names == ["pallet", "box"] and not (tmp_path / "labels.json").exists()
    assert labels.ids_for(["box"]) == [1] and _names(tmp_path) == ["pallet", "box"]


def test_an_existing_labels_json_is_kept_when_the_fixed_set_extends_it(tmp_path):
    (tmp_path / "labels.json").write_text(json.dumps({"names": ["pallet", "box"]}))
    labels = LabelMap(tmp_path / "labels.json", 10, ["pallet", "box", "person"])
    assert labels.ids_for(["person", "pallet"]) == [2, 0]
    assert _names(tmp_path) == ["pallet", "box", "person"]


@pytest.mark.parametrize(
    "held, message",
    [
        (["box", "pallet"], r"names class 0 'box', but spool.classes names it 'pallet'"),
        (["Pallet", "box"], r"names class 0 'Pallet', but spool.classes names it 'pallet'.*cl-agent labels rename Pallet pallet"),
        (["pallet", "box", "person", "truck"], r"holds 4 class names, spool.classes only 3: class 3 'truck' is not in spool.classes"),
    ],
)
def test_a_labels_json_conflicting_with_the_fixed_set_is_refused_at_start(tmp_path, held, message):
    (tmp_path / "labels.json").write_text(json.dumps({"names": held}))
    with pytest.raises(CLAgentError, match=message):
        LabelMap(tmp_path / "labels.json", 10, ["pallet", "box", "person"])
    assert _names(tmp_path) == held  # nothing written over it


def test_the_fixed_class_set_is_checked_in_the_config():
    assert load_config(None, {"spool.classes": ["pallet", "box"]}).spool.classes == ["pallet", "box"]
    with pytest.raises(ConfigError, match=r"spool.classes\[2\].*is spool.classes\[0\] too"):
        load_config(None, {"spool.classes": ["pallet", "box", "pallet"]})
    with pytest.raises(ConfigError, match=r"spool.classes\[1\].*differs from spool.classes\[0\] 'pallet' only in letter case"):
        load_config(None, {"spool.classes": ["pallet", "Pallet"]})
    with pytest.raises(ConfigError, match=r"spool.classes\[0\].*whitespace"):
        load_config(None, {"spool.classes": ["pallet "]})
    with pytest.raises(ConfigError, match=r"names 3 classes, more than spool.max_classes 2"):
        load_config(None, {"spool.classes": ["a", "b", "c"], "model.num_classes": 2})
    with pytest.raises(ConfigError, match=r"names 3 classes, more than spool.max_classes 2"):
        load_config(None, {"spool.classes": ["a", "b", "c"], "spool.max_classes": 2})


# --------------------------------------------------------------------------- limits


def test_names_past_max_classes_in_labels_json_are_refused_not_acked(tmp_path, caplog):
    """An older working directory's labels.json may name more classes than the model has outputs: the start
    warns, naming them, and their samples are nacked (never acked and then left out by the trainer)."""
    (tmp_path / "labels.json").write_text(json.dumps({"names": ["a", "b", "c"]}))
    with caplog.at_level("WARNING", logger="cl_agent.labels"):
        labels = LabelMap(tmp_path / "labels.json", max_classes=2)
    assert "holds 3 class names, more than spool.max_classes 2" in caplog.text and "'c'" in caplog.text
    assert labels.ids_for(["a", "b"]) == [0, 1]
    with pytest.raises(LabelError) as refused:
        labels.ids_for(["a", "c"])
    assert refused.value.reason == "too_many_classes" and "'c' has id 2" in str(refused.value)
    with make_service(tmp_path, spool={"max_classes": 2}) as service:
        client = LabeledClient(service.endpoints["labeled"], "robot")
        ack = client.send(images(1), ["c"], encoding="png")
        client.close()
    assert not ack.ok and ack.reason == "too_many_classes"
    assert _names(tmp_path) == ["a", "b", "c"]


def test_a_refused_new_class_names_its_zero_based_id(tmp_path):
    labels = LabelMap(tmp_path / "labels.json", max_classes=2)
    labels.ids_for(["a", "b"])
    with pytest.raises(LabelError, match=r"new class 'c' would get class id 2 \(ids are 0-based\), spool.max_classes is 2"):
        labels.ids_for(["c"])


def test_a_running_ingest_service_applies_the_fixed_class_set(tmp_path):
    """spool.classes reaches the agent's intake: a case variant is nacked over the real socket, naming the fix."""
    with make_service(tmp_path, spool={"classes": ["pallet", "box"]}) as service:
        _send(service, ["box"])
        client = LabeledClient(service.endpoints["labeled"], "robot-2")
        ack = client.send(images(1), ["Pallet"], encoding="png")
        client.close()
    assert not ack.ok and ack.reason == "bad_label" and "did you mean 'pallet'?" in ack.detail
    assert _names(tmp_path) == ["pallet", "box"]  # box keeps id 1 from the config, not 0 from arriving first
