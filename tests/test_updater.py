"""The update loop on durable experiences: backlog policies, online accuracy, restore without retraining."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from agent_harness import send_experience, tiny_agent_config
from cl_agent.client import LabeledClient
from cl_agent.experience import ExperienceStore
from cl_agent.ingest import IngestService
from cl_agent.repository import ModelRepository
from cl_agent.status import read_experience_records
from cl_agent.updater import Updater


def ingest_experiences(cfg, class_sets: list[list[int]]) -> None:
    """Make experiences durable through the real ingestion path (sockets, spool, store)."""
    rng = np.random.default_rng(0)
    with IngestService(cfg.ingest, cfg.spool, cfg.reservoir, cfg.experience, cfg.agent.workdir) as _:
        client = LabeledClient(cfg.ingest.labeled_endpoint, "updater-test", timeout_s=5.0)
        try:
            for classes in class_sets:
                send_experience(client, classes, 8, rng)
        finally:
            client.close()


@pytest.fixture
def backlog(tmp_path):
    def make(policy: str):
        cfg, _ = tiny_agent_config(tmp_path, **{"agent.backlog_policy": policy, "repository.announce_endpoint": "tcp://127.0.0.1:0"})
        ingest_experiences(cfg, [[0, 1], [1, 2], [2, 3]])
        return cfg

    return make


def test_merge_policy_learns_the_whole_backlog_in_one_update(backlog):
    cfg = backlog("merge")
    updater = Updater(cfg)
    try:
        result = updater.run_once()
        assert result.experiences == [0, 1, 2] and result.version == 1
        assert result.record["labeled"] == 48 and result.record["backlog"] == 0
        assert result.record["online_total"] == 48  # predicted before learning: an honest accuracy
        assert updater.run_once() is None  # nothing left
    finally:
        updater.close()
    assert ExperienceStore(cfg.agent.workdir).pending() == []
    assert ModelRepository(cfg.repository.root, cfg.agent.model_name).load_manifest(1)["experience_index"] == 2


def test_shorten_policy_takes_one_experience_at_a_time_and_reports_the_backlog(backlog):
    cfg = backlog("shorten")
    updater = Updater(cfg)
    try:
        first = updater.run_once()
        assert first.experiences == [0] and first.record["backlog"] == 2
        second = updater.run_once()
        assert second.experiences == [1] and second.version == first.version + 1
    finally:
        updater.close()


def test_a_restarted_updater_never_retrains_what_its_checkpoint_holds(backlog):
    cfg = backlog("shorten")
    updater = Updater(cfg)
    updater.run_once()
    updater.close()
    # a crash after the checkpoint but before the marks: experience 0 must not be trained again
    (ExperienceStore(cfg.agent.workdir).root / "000000" / "trained").unlink()
    again = Updater(cfg)
    try:
        assert again.last_trained == 0
        assert again.pending() == [1, 2]
        assert again.run_once().experiences == [1]
    finally:
        again.close()
    trained = [i for r in read_experience_records(cfg.agent.workdir) for i in r["merged"]]
    assert sorted(trained) == [0, 1]


def test_an_empty_announce_endpoint_turns_announcing_off_without_a_warning(tmp_path, caplog):
    cfg, _ = tiny_agent_config(tmp_path, **{"repository.announce_endpoint": ""})
    with caplog.at_level("WARNING", logger="cl_agent.updater"):
        updater = Updater(cfg)
    try:
        assert updater.announcer is None
    finally:
        updater.close()
    assert not [r for r in caplog.records if r.name == "cl_agent.updater" and r.levelno >= logging.WARNING]


def test_a_restart_after_a_rollback_does_not_publish_over_it(backlog):
    cfg = backlog("shorten")
    updater = Updater(cfg)
    try:
        updater.run_once()
        updater.run_once()
    finally:
        updater.close()
    repository = ModelRepository(cfg.repository.root, cfg.agent.model_name)
    rolled = repository.rollback(1)  # the operator goes back to the model of experience 0
    again = Updater(cfg)
    try:
        assert again.last_trained == 1
        assert repository.latest_version() == rolled  # nothing republished over the rollback
        assert again.recovered is None
    finally:
        again.close()


def test_a_refused_export_keeps_the_training_and_the_served_version_and_the_next_update_publishes(backlog, monkeypatch):
    import cl_agent.export
    from cl_agent.export import ExportError

    cfg = backlog("shorten")
    export_onnx = cl_agent.export.export_onnx
    refusals = {"left": 1}

    def refuse_once(*args, **kwargs):
        if refusals["left"]:
            refusals["left"] -= 1
            raise ExportError("parity check failed: top-1 differs from torch on 3 of 8 images")
        return export_onnx(*args, **kwargs)

    monkeypatch.setattr(cl_agent.export, "export_onnx", refuse_once)
    repository = ModelRepository(cfg.repository.root, cfg.agent.model_name)
    updater = Updater(cfg)
    try:
        refused = updater.run_once()  # trained and checkpointed, not published
        assert refused.experiences == [0] and refused.version is None
        assert refused.record["publish_error"].startswith("parity check failed")
        assert repository.latest_version() is None and updater.last_trained == 0
        published = updater.run_once()  # the trainer goes on; the next export passes
        assert published.experiences == [1] and published.version == 1 and "publish_error" not in published.record
    finally:
        updater.close()
    records = read_experience_records(cfg.agent.workdir)
    assert [r["merged"] for r in records] == [[0], [1]] and [r["version"] for r in records] == [None, 1]
    assert ExperienceStore(cfg.agent.workdir).pending() == [2]


def _fill_the_disk(monkeypatch) -> None:
    """Every model file the repository copies fails half-way as on a full disk (a real one cannot be made here)."""
    import errno

    import cl_agent.repository

    def copy_until_full(source, target, pause_s=0.0):
        with open(source, "rb") as src, open(target, "xb") as dst:
            dst.write(src.read(4096))  # a partial file in the hidden temp folder, as a real ENOSPC leaves
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(cl_agent.repository, "_copy_hashed", copy_until_full)


def test_a_repository_write_failure_keeps_the_training_and_leaves_no_partial_version(backlog, monkeypatch):
    """A full disk while publishing: the update stands, nothing half-written is left, the next update publishes."""
    import cl_agent.repository

    cfg = backlog("shorten")
    copy = cl_agent.repository._copy_hashed
    repository = ModelRepository(cfg.repository.root, cfg.agent.model_name)
    updater = Updater(cfg)
    try:
        _fill_the_disk(monkeypatch)
        failed = updater.run_once()  # trained and checkpointed, not published
        assert failed.experiences == [0] and failed.version is None and updater.last_trained == 0
        assert "No space left on device" in failed.record["publish_error"]
        assert repository.latest_version() is None
        assert [p.name for p in repository.model_dir.iterdir() if p.name.startswith(".tmp-")] == []
        monkeypatch.setattr(cl_agent.repository, "_copy_hashed", copy)  # space again
        published = updater.run_once()
        assert published.experiences == [1] and published.version == 1 and "publish_error" not in published.record
    finally:
        updater.close()
    assert [r["version"] for r in read_experience_records(cfg.agent.workdir)] == [None, 1]
    assert repository.load_manifest(1)["experience_index"] == 1


@pytest.mark.parametrize("failure", ["refused", "disk_full"])
def test_a_restart_whose_export_fails_again_goes_on_learning(backlog, monkeypatch, failure):
    """A checkpoint never published is exported again on restart; a second refusal must not stop the trainer."""
    import cl_agent.export
    from cl_agent.export import ExportError

    cfg = backlog("shorten")

    def refuse(*args, **kwargs):
        raise ExportError("parity check failed: max |p_onnx - p_torch| = 0.2 > export.parity_atol = 0.0001")

    if failure == "refused":
        monkeypatch.setattr(cl_agent.export, "export_onnx", refuse)
    else:
        _fill_the_disk(monkeypatch)
    updater = Updater(cfg)
    try:
        assert updater.run_once().version is None
    finally:
        updater.close()
    again = Updater(cfg)  # exports checkpoint 0 again: fails again, and that is not a setup error
    try:
        assert again.last_trained == 0 and again.pending() == [1, 2]
        monkeypatch.undo()
        assert again.run_once().version == 1
    finally:
        again.close()


def test_a_stop_during_training_leaves_nothing_and_the_restart_trains_the_experience(backlog):
    # docs/deployment.md: a stop during training abandons the update at the next step; nothing of it is
    # checkpointed or published, and its experiences stay pending, trained again after the restart.
    from cl_agent.updater import UpdateInterrupted

    cfg = backlog("shorten")
    repo = ModelRepository(cfg.repository.root, cfg.agent.model_name)
    updater = Updater(cfg)
    steps = []
    try:
        with pytest.raises(UpdateInterrupted):
            updater.run_once(should_stop=lambda: True, progress=steps.append)
        assert steps == []  # interrupted at its first step, before reporting it
        assert updater._checkpoints() == []
        assert updater.pending() == [0, 1, 2]
    finally:
        updater.close()
    assert repo.versions() == [] and repo.last_version_ever() == 0
    assert ExperienceStore(cfg.agent.workdir).pending() == [0, 1, 2]
    assert read_experience_records(cfg.agent.workdir) == []

    again = Updater(cfg)  # the restart
    try:
        assert again.last_trained == -1 and again.pending() == [0, 1, 2]
        result = again.run_once()
        assert result.experiences == [0] and result.version == 1
        assert [index for index, _ in again._checkpoints()] == [0]
    finally:
        again.close()
    assert ExperienceStore(cfg.agent.workdir).pending() == [1, 2]


def test_an_update_reports_each_phase_with_the_steps_training_did(tmp_path):
    # A time budget that every step spends ends training after its first step: the later phases are
    # reported as they begin, with 1 of the planned steps, not inferred from the last planned step.
    from cl_agent.status import CHECKING_PARITY, CHECKPOINTING, EXPORTING, PUBLISHING, TRAINING

    cfg, _ = tiny_agent_config(tmp_path, **{"train.time_budget_s": 1e-9})
    ingest_experiences(cfg, [[0, 1], [1, 2], [2, 3]])  # merged into one update of experience 2
    updater = Updater(cfg)
    messages = []
    try:
        result = updater.run_once(progress=messages.append)
    finally:
        updater.close()
    assert result.version == 1 and result.record["stopped_by_budget"]
    planned = messages[0]["steps"]
    assert planned > 1
    assert [(m["phase"], m["step"], m["steps"]) for m in messages] == [
        (TRAINING, 1, planned), (CHECKPOINTING, 1, planned), (EXPORTING, 1, planned),
        (CHECKING_PARITY, 1, planned), (PUBLISHING, 1, planned),
    ]
    assert "losses" in messages[0] and all(m["experience"] == 2 for m in messages)


def test_checkpoint_names_of_six_or_more_digits_are_found_in_numeric_order(tmp_path):
    from cl_agent.updater import checkpoints_in

    for name in ("exp-1000000.pt", "exp-999999.pt", "exp-12345678.pt", "exp-999998.pt",
                 "exp-12345.pt", "exp-1000000.pt.tmp", "exp-x00000.pt"):  # the last three are not checkpoint names
        (tmp_path / name).write_bytes(b"")
    assert [n for n, _ in checkpoints_in(tmp_path)] == [999998, 999999, 1000000, 12345678]


def test_checkpoints_past_experience_999999_are_rotated_and_restored(tmp_path):
    cfg, _ = tiny_agent_config(tmp_path, **{"repository.announce_endpoint": ""})
    updater = Updater(cfg)
    try:
        for experience in (999_999, 1_000_000, 1_000_001):
            updater._checkpoint(experience)
    finally:
        updater.close()
    checkpoint_dir = Path(cfg.agent.workdir) / "checkpoints"
    assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["exp-1000000.pt", "exp-1000001.pt"]
    again = Updater(cfg)  # a restart goes on from the newest, and publishes it (it never was)
    try:
        assert again.last_trained == 1_000_001
        assert ModelRepository(cfg.repository.root, cfg.agent.model_name).load_manifest(1)["experience_index"] == 1_000_001
    finally:
        again.close()
