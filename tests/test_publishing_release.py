"""A checkpoint a hold (or a failed export) kept unpublished: published at release or restart, and status says so."""

from __future__ import annotations

import threading

import pytest

from agent_harness import tiny_agent_config
from cl_agent.repository import ModelRepository
from cl_agent.status import initial_state, print_status, read_experience_records, write_state
from cl_agent.updater import Updater, newest_trained, update_loop
from test_updater import ingest_experiences


@pytest.fixture
def agent(tmp_path):
    """A tiny agent config with three experiences ingested (one update each)."""
    cfg, _ = tiny_agent_config(tmp_path, **{"agent.backlog_policy": "shorten", "repository.announce_endpoint": ""})
    ingest_experiences(cfg, [[0, 1], [1, 2], [2, 3]])
    return cfg


def status_rows(cfg, capsys) -> dict[str, str]:
    """``cl-agent status`` of a stopped agent whose state.json names its repository, as rows."""
    state = initial_state() | {"status": "stopped", "model_repository": {
        "root": str(ModelRepository(cfg.repository.root, cfg.agent.model_name).root.resolve()), "model": cfg.agent.model_name}}
    write_state(cfg.agent.workdir, state)
    print_status(cfg.agent.workdir)
    out = capsys.readouterr().out
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in out.splitlines() if ":" in line and not line.startswith(" "))}


def hold_and_train(cfg, reason="drops cups") -> ModelRepository:
    """Version 1 from experience 0; then a hold, and experience 1 trained and checkpointed, not published."""
    repository = ModelRepository(cfg.repository.root, cfg.agent.model_name)
    updater = Updater(cfg)
    try:
        assert updater.run_once().version == 1
        repository.hold(reason)
        assert updater.run_once().record["held"] is True
    finally:
        updater.close()
    return repository


def test_status_shows_the_hold_from_the_hold_file_with_who_why_and_since(agent, capsys):
    repository = hold_and_train(agent)
    rows = status_rows(agent, capsys)
    held = rows["publishing held"]
    assert "drops cups" in held and " by " in held and "since " in held and str(repository.hold_path) in held
    assert "experience 1 trained and checkpointed, not published" in held
    assert rows["last trained version"] == "1"
    repository.release()  # no update, no restart: status follows the file
    rows = status_rows(agent, capsys)
    assert "publishing held" not in rows
    assert rows["not published"].startswith("experience 1: trained while publishing was held; released since")


def test_a_restart_after_release_publishes_the_held_checkpoint_and_status_names_it(agent, capsys):
    repository = hold_and_train(agent)
    repository.release()
    again = Updater(agent)  # "checkpoint of experience 1 was never published: exporting it now"
    try:
        assert repository.versions() == [1, 2] and repository.load_manifest(2)["experience_index"] == 1
        assert again.republished is not None and again.republished.version == 2
    finally:
        again.close()
    records = read_experience_records(agent.agent.workdir)
    assert [(r["experience"], r["version"], r.get("republished")) for r in records] == [(0, 1, None), (1, None, None), (1, 2, "restart")]
    assert records[-1]["merged"] == []  # it trains nothing
    assert newest_trained(agent.agent.workdir) == (1, 2)
    rows = status_rows(agent, capsys)
    assert rows["last trained version"] == "2"
    assert "publishing held" not in rows and "not published" not in rows
    assert rows["trained records"].startswith("2 (last: experience 1 ")  # the publication is no trained record
    again = Updater(agent)  # published: nothing more at the next start
    try:
        assert again.republished is None and repository.versions() == [1, 2]
    finally:
        again.close()


def test_a_failed_export_republished_at_restart_is_no_longer_reported_as_not_published(agent, capsys, monkeypatch):
    import cl_agent.export
    from cl_agent.export import ExportError

    def refuse(*args, **kwargs):
        raise ExportError("parity check failed: top-1 differs")

    monkeypatch.setattr(cl_agent.export, "export_onnx", refuse)
    updater = Updater(agent)
    try:
        assert "publish_error" in updater.run_once().record
    finally:
        updater.close()
    assert status_rows(agent, capsys)["not published"].startswith("experience 0: parity check failed")
    monkeypatch.undo()
    again = Updater(agent)
    try:
        assert again.republished.version == 1
    finally:
        again.close()
    rows = status_rows(agent, capsys)
    assert "not published" not in rows and rows["last trained version"] == "1"


def test_a_release_while_the_agent_idles_publishes_the_held_checkpoint_without_new_data(tmp_path):
    cfg, _ = tiny_agent_config(tmp_path, **{"agent.backlog_policy": "shorten", "repository.announce_endpoint": ""})
    ingest_experiences(cfg, [[0, 1]])
    repository = ModelRepository(cfg.repository.root, cfg.agent.model_name)
    updater = Updater(cfg)
    try:
        assert updater.run_once().version == 1
    finally:
        updater.close()
    ingest_experiences(cfg, [[1, 2]])  # experience 1, trained by the loop while held
    repository.hold("checking")
    results, arrived, stop = [], threading.Semaphore(0), threading.Event()

    def on_result(result) -> None:
        results.append(result.record)
        arrived.release()

    loop = threading.Thread(target=update_loop, args=(cfg, stop), kwargs={"poll_s": 0.05, "on_result": on_result})
    loop.start()
    try:
        assert arrived.acquire(timeout=120), "the held update never finished"
        assert results[0]["held"] is True and repository.versions() == [1]
        repository.release()
        assert arrived.acquire(timeout=120), "the released checkpoint was not published while idle"
    finally:
        stop.set()
        loop.join(60)
    assert results[1]["republished"] == "hold released" and results[1]["version"] == 2
    assert repository.load_manifest(2)["experience_index"] == 1
    assert [r.get("republished") for r in read_experience_records(cfg.agent.workdir)] == [None, None, "hold released"]
