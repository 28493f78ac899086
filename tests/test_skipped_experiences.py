"""An experience the trainer had to skip (no usable images) changes neither the model version nor the update metrics."""

import queue

from cl_agent.agent import Agent
from cl_agent.config import load_config
from cl_agent.metrics import AgentMetrics
from cl_agent.status import append_experience_record, initial_state, print_status, write_state


def _record(experience, version, **extra):
    return {
        "experience": experience, "labeled": 0 if version is None else 20, "unlabeled": 0, "merged": [experience],
        "online_accuracy": None, "online_correct": 0, "online_total": 0, "online_accuracy_per_class": {},
        "losses": {}, "update_seconds": 0.0, "export_seconds": 0.0, "version": version,
        "stopped_by_budget": False, "recovered": False, **extra,
    }


def test_a_skipped_experience_keeps_the_published_version_and_counts_no_training(tmp_path):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path)}))
    agent.results = queue.Queue()
    metrics = AgentMetrics()
    state = initial_state() | {"model_version": 3}
    agent.results.put(_record(4, None, skipped="0 usable labeled images, an update needs 2"))
    agent._drain_results(state, metrics, None)
    assert state["model_version"] == 3
    assert state["last_experience"] == 4  # handled: it no longer waits
    assert not metrics.value("experiences_trained_total")
    assert not metrics.value("update_duration_seconds_count")


def _status_after_a_published_then_an_unpublished_record(tmp_path, capsys, **unpublished) -> str:
    """`cl-agent status` output after version 1 (experience 0) and then experience 1 without a version."""
    write_state(tmp_path, initial_state() | {"model_version": 1})
    append_experience_record(tmp_path, _record(0, 1))
    append_experience_record(tmp_path, _record(1, None, **unpublished))
    print_status(tmp_path)
    return capsys.readouterr().out


def test_status_shows_the_last_published_version_and_says_the_last_experience_was_skipped(tmp_path, capsys):
    out = _status_after_a_published_then_an_unpublished_record(tmp_path, capsys, skipped="0 usable labeled images, an update needs 2")
    assert "last trained version:" in out and out.split("last trained version:")[1].split("\n")[0].strip() == "1"
    assert "experience 1: 0 usable labeled images" in out


def test_status_says_the_last_export_was_refused_and_keeps_the_last_published_version(tmp_path, capsys):
    out = _status_after_a_published_then_an_unpublished_record(
        tmp_path, capsys, publish_error="parity check failed: top-1 differs from torch on 3 of 8 images"
    )
    assert out.split("last trained version:")[1].split("\n")[0].strip() == "1"
    refused = out.split("not published:")[1].split("\n")[0]
    assert "experience 1: parity check failed" in refused and "served version stays" in refused


def test_report_on_a_missing_workdir_says_the_folder_is_not_there(tmp_path):
    import pytest

    from cl_agent.errors import CLAgentError
    from cl_agent.status import write_report

    with pytest.raises(CLAgentError, match="folder not found"):
        write_report(tmp_path / "typo")
