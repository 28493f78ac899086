"""Holding publishing: the agent trains and checkpoints on, publishes nothing, and publishes again once released."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cl_agent.errors import CLAgentError
from cl_agent.repository import HOLD_FILE, ModelRepository, PublishingHeld
from cl_agent.status import read_experience_records, usable_experience_records
from cl_agent.updater import Updater, newest_trained
from test_repository import fake_model, publish
from test_updater import ingest_experiences
from agent_harness import tiny_agent_config


@pytest.fixture
def agent(tmp_path):
    """A tiny agent config with three experiences ingested (one update each)."""
    cfg, _ = tiny_agent_config(tmp_path, **{"agent.backlog_policy": "shorten", "repository.announce_endpoint": ""})
    ingest_experiences(cfg, [[0, 1], [1, 2], [2, 3]])
    return cfg


def checkpoints(cfg) -> list[str]:
    return sorted(p.name for p in (Path(cfg.agent.workdir) / "checkpoints").iterdir())


def test_a_held_update_trains_and_checkpoints_but_publishes_nothing_and_release_publishes_again(agent, caplog):
    repository = ModelRepository(agent.repository.root, agent.agent.model_name)
    updater = Updater(agent)
    try:
        assert updater.run_once().version == 1
        repository.hold("bad model on the arm")
        with caplog.at_level(logging.WARNING, logger="cl_agent.updater"):
            held = updater.run_once()
        assert held.version is None and held.record["held"] is True and "publish_error" not in held.record
        assert repository.versions() == [1]
        assert "exp-000001.pt" in checkpoints(agent) and updater.last_trained == 1  # nothing learned is lost
        messages = [r.getMessage() for r in caplog.records if "publishing held" in r.getMessage()]
        assert len(messages) == 1, messages
        assert f"publishing held by {repository.hold_path} (" in messages[0] and "bad model on the arm" in messages[0]
        assert f"`cl-agent models release --repo {agent.repository.root} --model student` to resume" in messages[0]

        assert repository.release() is not None
        released = updater.run_once()  # no restart: the hold is looked up at each publish
        assert released.version == 2 and "held" not in released.record
        assert repository.load_manifest(2)["experience_index"] == 2  # includes what was trained while held
    finally:
        updater.close()
    records = read_experience_records(agent.agent.workdir)
    assert [(r["version"], r.get("held")) for r in records] == [(1, None), (None, True), (2, None)]
    usable, skipped = usable_experience_records(agent.agent.workdir)  # what status and report read
    assert len(usable) == 3 and skipped == []
    assert newest_trained(agent.agent.workdir) == (2, 2)


def test_a_restart_while_held_exports_nothing_and_the_hold_holds(agent):
    repository = ModelRepository(agent.repository.root, agent.agent.model_name)
    updater = Updater(agent)
    try:
        updater.run_once()
        repository.hold(None)
        updater.run_once()
    finally:
        updater.close()
    again = Updater(agent)  # the checkpoint of experience 1 was never published: held at start too
    try:
        assert again.last_trained == 1 and repository.versions() == [1]
    finally:
        again.close()
    repository.release()
    after = Updater(agent)  # released: the unpublished checkpoint goes out at start, as after a crash
    try:
        assert repository.versions() == [1, 2] and repository.load_manifest(2)["experience_index"] == 1
    finally:
        after.close()


def test_a_publish_that_honours_holds_is_refused_under_the_lock_and_others_are_not(tmp_path):
    repository = ModelRepository(tmp_path / "models", "student")
    publish(repository, tmp_path, b"a")
    hold, before = repository.hold("checking")
    assert before is None
    assert json.loads(repository.hold_path.read_text())["reason"] == "checking" and hold.held_by and hold.held_at
    with pytest.raises(PublishingHeld, match="publishing held by .*checking"):
        repository.publish(fake_model(tmp_path, b"b"), {"class_names": ["a"], "image_size": 16}, honour_hold=True)
    assert repository.versions() == [1] and repository.last_version_ever() == 1
    assert repository.rollback(1) == 2  # an operator's republish is not held
    assert repository.release().reason == "checking" and repository.publishing_hold() is None
    assert repository.release() is None


def test_a_damaged_hold_file_still_holds(tmp_path):
    repository = ModelRepository(tmp_path / "models", "student")
    publish(repository, tmp_path, b"a")
    repository.hold_path.write_text("{not json")
    hold = repository.publishing_hold()
    assert hold is not None and "not valid JSON" in hold.problem
    assert repository.versions() == [1]  # nor does it look like a version


def test_a_hold_on_a_model_that_is_not_there_names_the_models_that_are(tmp_path):
    repository = ModelRepository(tmp_path / "models", "student")
    publish(repository, tmp_path, b"a")
    with pytest.raises(CLAgentError, match=r"no model 'studnet' .* \(models there: student\)"):
        ModelRepository(tmp_path / "models", "studnet").hold(None)
    assert not (tmp_path / "models" / "studnet").exists()
    assert HOLD_FILE.startswith(".") and not HOLD_FILE.split(".")[1].isdigit()


def test_rollback_with_hold_from_the_command_line_stands_until_release(tmp_path, monkeypatch, capsys):
    import sys

    from cl_agent.cli import main

    cfg, config_file = tiny_agent_config(tmp_path, **{"agent.backlog_policy": "shorten", "repository.announce_endpoint": ""})
    ingest_experiences(cfg, [[0, 1], [1, 2], [2, 3]])
    repository = ModelRepository(cfg.repository.root, cfg.agent.model_name)
    updater = Updater(cfg)
    try:
        assert updater.run_once().version == 1
        monkeypatch.setattr(sys, "argv", ["cl-agent", "models", "rollback", "--to", "1", "--hold", "--config", str(config_file)])
        with pytest.raises(SystemExit) as stopped:
            main()
        out = capsys.readouterr().out
        assert stopped.value.code == 0 and "published as version 2" in out and "publishing stays held" in out
        assert repository.publishing_hold().reason == "rolled back to version 1"
        assert repository.load_manifest(2)["rollback_of"] == 1

        held = updater.run_once()  # the next experience: trained, not published over the rollback
        assert held.version is None and held.record["held"] and repository.versions() == [1, 2]

        monkeypatch.setattr(sys, "argv", ["cl-agent", "models", "release", "--config", str(config_file)])
        with pytest.raises(SystemExit) as stopped:
            main()
        assert stopped.value.code == 0
        assert updater.run_once().version == 3
        assert repository.load_manifest(3)["experience_index"] == 2 and repository.load_manifest(3)["parent_version"] == 2
    finally:
        updater.close()


def test_servers_and_followers_pass_the_hold_marker_by(tmp_path):
    """A held repository, and a follower's copy with a marker of its own: both serve and mirror versions only."""
    from test_fetch import Edge, tiny_onnx

    from cl_agent.fetch import FetchClient, ModelFetchService

    source = ModelRepository(tmp_path / "agent-models", "student")
    models = [tiny_onnx(tmp_path / f"tiny{i}.onnx", i) for i in range(2)]
    source.publish(models[0], {"class_names": ["cat", "dog", "cup"], "image_size": 8})
    source.hold("testing")
    source.rollback(1)  # an operator's republish while held: version 2
    edge_root = tmp_path / "edge"
    (edge_root / "student").mkdir(parents=True)
    (edge_root / "student" / HOLD_FILE).write_text('{"reason": "copied along"}')
    with ModelFetchService(source, "tcp://127.0.0.1:*") as service:
        client = FetchClient(service.endpoint, "student", timeout_s=2.0)
        try:
            assert client.list_versions() == [1, 2]
        finally:
            client.close()
        with Edge(edge_root, service.endpoint, None) as edge:
            assert edge.answers(2)
            assert edge.repository.versions() == [2] and edge.server.counters["swap_failures"] == 0
    assert service.counters["errors"] == 0


def test_going_on_from_the_rolled_back_models_weights_needs_its_checkpoint_and_the_lost_checkpoint_flag(agent):
    """What docs/serving.md describes: hold, stop, move the newer checkpoint away, start once with
    agent.accept_lost_checkpoints, release: the next version is trained from the rolled-back model."""
    import numpy as np
    import onnxruntime
    import torch

    repository = ModelRepository(agent.repository.root, agent.agent.model_name)
    updater = Updater(agent)
    try:
        updater.run_once()
        updater.run_once()  # version 2, from experience 1: the bad one
    finally:
        updater.close()
    assert repository.rollback(1, hold_reason="bad") == 3  # the model of experience 0
    assert checkpoints(agent) == ["exp-000000.pt", "exp-000001.pt"]  # only the newest two are kept
    workdir = Path(agent.agent.workdir)
    (workdir / "checkpoints" / "exp-000001.pt").rename(workdir / "exp-000001.pt.bad")
    with pytest.raises(CLAgentError, match="experiences up to 1 were trained"):
        Updater(agent)
    agent.agent.accept_lost_checkpoints = True
    restored = Updater(agent)
    try:
        assert restored.last_trained == 0 and repository.versions() == [1, 2, 3]  # nothing exported at start
        images = (np.random.default_rng(0).random((4, 16, 16, 3)) * 255).astype(np.uint8)
        session = onnxruntime.InferenceSession(str(repository.model_path(3)), providers=["CPUExecutionProvider"])
        served = session.run(["logits"], {"images": images})[0]
        np.testing.assert_allclose(restored.trainer.predict(torch.from_numpy(images)).numpy(), served, atol=1e-3)
        repository.release()
        result = restored.run_once()  # experience 1 is not trained again: experience 2 comes next
        assert result.experiences == [2] and result.version == 4
    finally:
        restored.close()
