"""An experience the trainer had to skip (no usable images) changes neither the model version nor the update metrics."""

import logging
import queue

import numpy as np
import pytest

from agent_harness import send_experience, tiny_agent_config
from cl_agent.agent import Agent
from cl_agent.client import LabeledClient
from cl_agent.config import load_config
from cl_agent.experience import ExperienceStore
from cl_agent.ingest import IngestService
from cl_agent.metrics import AgentMetrics
from cl_agent.status import append_experience_record, initial_state, print_status, read_experience_records, write_state
from cl_agent.updater import Updater


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


def _cut_experiences(cfg, class_sets: list[list[int]]) -> None:
    """Cut experiences through the real ingestion path (socket, spool, store)."""
    rng = np.random.default_rng(0)
    with IngestService(cfg.ingest, cfg.spool, cfg.reservoir, cfg.experience, cfg.agent.workdir):
        client = LabeledClient(cfg.ingest.labeled_endpoint, "skip-test", timeout_s=5.0)
        try:
            for classes in class_sets:
                send_experience(client, classes, 8, rng)
        finally:
            client.close()


@pytest.mark.parametrize("damage", ["segment deleted", "segment truncated", "draw deleted"])
def test_an_experience_whose_files_are_lost_or_damaged_is_skipped_and_the_trainer_goes_on(tmp_path, caplog, damage):
    cfg, _ = tiny_agent_config(tmp_path, **{"agent.backlog_policy": "merge", "repository.announce_endpoint": ""})
    _cut_experiences(cfg, [[0, 1], [1, 2], [2, 3]])
    store = ExperienceStore(cfg.agent.workdir)
    segment = store.spool_dir / store.meta(1)["labeled_segment"]
    damaged = store.experience_dir(1) / "unlabeled.log" if damage == "draw deleted" else segment
    if damage == "segment truncated":
        segment.write_bytes(segment.read_bytes()[: segment.stat().st_size // 2])
    else:
        damaged.unlink()
    updater = Updater(cfg)
    try:
        with caplog.at_level(logging.ERROR, logger="cl_agent.updater"):
            skipped = updater.run_once()
        # only the damaged experience is skipped, not the others merged with it
        assert skipped.experiences == [1] and skipped.version is None
        assert str(damaged) in skipped.record["skipped"]
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("experience 1" in m and str(damaged) in m for m in errors), errors
        trained = updater.run_once()
        assert trained.experiences == [0, 2] and trained.version == 1
        assert updater.run_once() is None
    finally:
        updater.close()
    assert store.pending() == []
    assert [(r["merged"], bool(r.get("skipped"))) for r in read_experience_records(cfg.agent.workdir)] == [([1], True), ([0, 2], False)]
