"""`cl-agent status`: the update under way with its step count, and version rows that mean one thing each."""

import pytest

from cl_agent.agent import Agent
from cl_agent.config import load_config
from cl_agent.metrics import AgentMetrics
from cl_agent.repository import ModelRepository
from cl_agent.status import CHECKING_PARITY, EXPORTING, TRAINING, append_experience_record, initial_state, print_status, write_state


def record(experience, version):
    return {
        "experience": experience, "labeled": 20, "unlabeled": 0, "merged": [experience], "online_accuracy": 0.5,
        "online_correct": 10, "online_total": 20, "online_accuracy_per_class": {}, "losses": {"ce": 1.0},
        "update_seconds": 1.0, "export_seconds": 0.5, "version": version, "stopped_by_budget": False,
    }


def status_rows(workdir, capsys) -> dict[str, str]:
    print_status(workdir)
    out = capsys.readouterr().out
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith(" "))}


def test_status_during_training_shows_the_step_count_elapsed_and_time_left(tmp_path, capsys):
    update = {"experience": 1, "phase": TRAINING, "step": 119, "steps": 160, "elapsed_s": 190.0, "eta_s": 65.0,
              "phase_elapsed_s": 190.0}
    write_state(tmp_path, initial_state() | {"pending_experiences": 1, "update": update})
    rows = status_rows(tmp_path, capsys)
    assert rows["pending"] == "1 experience(s) waiting to be trained"
    assert rows["update"] == "experience 1: training, step 119/160 (74%), 3m10s elapsed, about 1m05s left"


def test_status_after_training_shows_the_reported_phase_and_when_idle_shows_no_update(tmp_path, capsys):
    update = {"experience": 1, "phase": EXPORTING, "step": 160, "steps": 160, "elapsed_s": 300.0, "eta_s": 0.0,
              "phase_elapsed_s": 12.0}
    write_state(tmp_path, initial_state() | {"update": update})
    assert status_rows(tmp_path, capsys)["update"] == "experience 1: exporting after 160/160 steps (for 12s)"
    write_state(tmp_path, initial_state() | {"update": update | {"phase": CHECKING_PARITY, "step": 37, "phase_elapsed_s": 2.0}})
    assert status_rows(tmp_path, capsys)["update"] == "experience 1: checking parity after 37/160 steps (for 2s)"
    # the phase an agent wrote before phases were reported
    write_state(tmp_path, initial_state() | {"update": update | {"phase": "exporting and publishing"}})
    assert status_rows(tmp_path, capsys)["update"] == "experience 1: exporting and publishing after 160/160 steps (for 12s)"
    write_state(tmp_path, initial_state() | {"update": None})
    assert "update" not in status_rows(tmp_path, capsys)
    write_state(tmp_path, initial_state() | {"update": update, "status": "stopped"})  # a stopped agent trains nothing
    assert "update" not in status_rows(tmp_path, capsys)


def test_after_a_rollback_published_and_served_agree_and_the_last_trained_version_is_named_as_such(tmp_path, capsys):
    # Trained versions 1 and 2, then `cl-agent models rollback --to 1` published version 3.
    append_experience_record(tmp_path, record(0, 1))
    append_experience_record(tmp_path, record(1, 2))
    write_state(tmp_path, initial_state() | {"published_version": 3, "model_version": 3, "served_version": 3,
                                             "last_trained_version": 2})
    rows = status_rows(tmp_path, capsys)
    assert (rows["published version"], rows["served version"], rows["last trained version"]) == ("3", "3", "2")
    assert "model version" not in rows and "last version" not in rows


def test_a_state_written_before_published_version_existed_still_shows_its_model_version(tmp_path, capsys):
    state = initial_state() | {"model_version": 4}
    write_state(tmp_path, state)
    assert status_rows(tmp_path, capsys)["published version"] == "4"


@pytest.fixture
def repository_with_two_versions(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read here")
    repository = ModelRepository(tmp_path / "repo", "student")
    for experience in (0, 1):
        repository.publish(model, {"class_names": ["a", "b"], "image_size": 16, "experience_index": experience})
    return repository


def test_the_agent_reads_the_published_version_from_the_repository_so_a_rollback_shows(tmp_path, repository_with_two_versions):
    cfg = load_config(None, {"agent.workdir": str(tmp_path / "work"), "repository.root": str(tmp_path / "repo")})
    agent, metrics = Agent(cfg), AgentMetrics()
    state = initial_state() | {"last_trained_version": 2}
    agent._refresh_published(state, metrics, None)
    assert state["published_version"] == state["model_version"] == 2
    assert repository_with_two_versions.rollback(1) == 3
    agent._refresh_published(state, metrics, None)
    assert state["published_version"] == state["model_version"] == 3 and state["last_trained_version"] == 2
    assert metrics.value("published_version") == 3


def test_a_held_update_keeps_the_last_trained_version(tmp_path):
    import queue

    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path / "w"), "repository.root": str(tmp_path / "r")}))
    agent.results = queue.Queue()
    agent.results.put(record(5, None) | {"held": True, "recovered": False})  # trained, publishing held: no version
    state = initial_state() | {"last_trained_version": 2, "published_version": 2}
    agent._drain_results(state, AgentMetrics(), None)
    assert state["last_trained_version"] == 2 and state["last_experience"] == 5
