"""A start the trainer would refuse stops the agent before its ingestion opens: nothing is acked that cannot be trained."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading

import numpy as np
import pytest

from agent_harness import IMAGE_SIZE, tiny_agent_config
from cl_agent.agent import Agent, check_trainer_start, install_stop_handlers
from cl_agent.storage import lock_workdir
from cl_agent.client import LabeledClient
from cl_agent.errors import BusyError, CLAgentError
from cl_agent.ingest import IngestService, run_ingest
from cl_agent.launcher import AgentProcess
from cl_agent.synthetic import CLASS_NAMES, make_batch
from cl_agent.trainer import Trainer
from cl_agent.updater import CHECKPOINT_DIR


def _checkpoint_of(cfg) -> None:
    """A checkpoint in ``cfg``'s working directory, trained with ``cfg``'s model section (untrained is enough)."""
    Trainer(cfg.model, cfg.train).save_checkpoint(os.path.join(cfg.agent.workdir, CHECKPOINT_DIR, "exp-000000.pt"))


def test_an_incompatible_checkpoint_stops_the_agent_before_it_acks_anything(tmp_path):
    trained, _ = tiny_agent_config(tmp_path)
    _checkpoint_of(trained)
    more_classes = len(CLASS_NAMES) + 2
    cfg, path = tiny_agent_config(tmp_path, **{"model.num_classes": more_classes})  # the same working directory
    agent = AgentProcess(path, tmp_path / "agent.log")
    client = LabeledClient(cfg.ingest.labeled_endpoint, timeout_s=60, retries=0)
    acks = []
    try:
        # Sent while the agent starts: delivered (and acked) as soon as its labeled socket is bound, if ever.
        client.submit(make_batch(np.array([0, 1, 2]), np.random.default_rng(0), IMAGE_SIZE), CLASS_NAMES[:3])
        while agent.alive():
            acks += client.poll_acks()
            try:
                agent.process.wait(0.2)
            except subprocess.TimeoutExpired:
                pass
        acks += client.poll_acks()
    finally:
        client.close()
        if agent.alive():
            agent.kill9()
    assert agent.process.returncode == 2
    assert acks == []  # nothing acked: the labeled socket was never bound
    workdir = tmp_path / "agent"
    assert not (workdir / "labels.json").exists()
    state = json.loads((workdir / "state.json").read_text())
    assert state["status"] == "stopped"
    assert state["stop_error"].startswith("trainer cannot start: checkpoint ")
    assert f"model.num_classes: {len(CLASS_NAMES)} there, {more_classes} in the config" in state["stop_error"]
    output = (tmp_path / "agent.log").read_text()
    assert output.count("trainer cannot start") == 1, output  # logged once, not by the trainer and the agent


def test_the_device_and_the_repository_owner_are_checked_before_ingestion(tmp_path):
    cfg, _ = tiny_agent_config(tmp_path / "b")
    check_trainer_start(cfg)  # a new working directory: nothing to refuse
    cfg.agent.device = "cuda:99"
    with pytest.raises(CLAgentError, match=r"^agent.device = 'cuda:99': "):
        check_trainer_start(cfg)
    cfg.agent.device = "cpu"
    # the newest version of the model was published by another agent (another working directory's id)
    from test_operator_changes import _trained

    other = _trained(tmp_path / "a", [[0, 1]])
    cfg.repository.root = other.repository.root
    with pytest.raises(CLAgentError, match="published by another agent"):
        check_trainer_start(cfg)


def test_ingest_refuses_a_workdir_an_agent_runs_in_before_writing_anything(tmp_path):
    cfg, _ = tiny_agent_config(tmp_path)
    workdir = tmp_path / "agent"
    # what a running agent holds: the working directory's lock, and the spool (through its ingestion)
    held = lock_workdir(workdir)
    service = IngestService(cfg.ingest, cfg.spool, cfg.reservoir, cfg.experience, workdir).start()
    try:
        before = sorted(p.name for p in workdir.iterdir())
        with pytest.raises(BusyError) as refused:
            run_ingest(cfg)
        assert not (workdir / "ingest-config.yaml").exists()
        assert sorted(p.name for p in workdir.iterdir()) == before
        assert f"another agent (pid {os.getpid()}) is running in" in str(refused.value)
    finally:
        service.stop()
        held.close()


def test_a_second_signal_during_the_stop_says_what_the_stop_waits_for(tmp_path, caplog):
    cfg, _ = tiny_agent_config(tmp_path, **{"agent.grace_period_s": 30.0})
    agent = Agent(cfg)
    agent.trainer = object()  # started (the message differs during the start-up)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    handled = threading.Event()
    try:
        install_stop_handlers(agent.stop_requested, again=lambda: (agent._still_stopping(), handled.set()))
        with caplog.at_level(logging.WARNING, logger="cl_agent.agent"):
            os.kill(os.getpid(), signal.SIGTERM)
            assert agent.stop_requested.wait(10)
            assert "still stopping" not in caplog.text  # the first signal only stops
            os.kill(os.getpid(), signal.SIGINT)
            assert handled.wait(10)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert caplog.text.count("still stopping") == 1
    assert "up to 30 s left before it is killed (kill -9 to stop now; nothing acked is lost)" in caplog.text


def test_a_backbone_that_cannot_take_the_image_size_is_refused_before_ingestion(tmp_path):
    cfg, _ = tiny_agent_config(tmp_path)
    cfg.model.backbone = "vit_tiny_patch16_224"  # needs 224x224 images; the config says 16
    with pytest.raises(CLAgentError, match=r"'vit_tiny_patch16_224' cannot run on 16x16 images \(model.image_size\)"):
        check_trainer_start(cfg)
    cfg.model.backbone = "resnet10t"
    check_trainer_start(cfg)  # a backbone that runs at 16 px passes


@pytest.mark.parametrize("order", ["permuted", "published"])
def test_a_lost_labels_json_is_refused_by_cl_agent_run_whatever_spool_classes_says(tmp_path, order):
    """`cl-agent run` on a trained, published working directory whose labels.json was moved away, with
    spool.classes standing in: exit 2 naming the file and `cl-agent labels restore`, labels.json not rewritten."""
    from test_operator_changes import _trained

    _trained(tmp_path, [[0, 1, 2]])
    workdir = tmp_path / "agent"
    names = json.loads((workdir / "labels.json").read_text())["names"]
    (workdir / "labels.json").rename(tmp_path / "elsewhere.json")
    classes = [names[2], names[0], names[1]] if order == "permuted" else names
    _, path = tiny_agent_config(tmp_path, **{"repository.announce_endpoint": "", "spool.classes": classes})
    agent = AgentProcess(path, tmp_path / "agent.log")
    try:
        assert agent.process.wait(120) == 2
    finally:
        if agent.alive():
            agent.kill9()
    output = (tmp_path / "agent.log").read_text()
    assert "labels.json" in output and "cl-agent labels restore" in output, output
    if order == "permuted":
        assert f"names class 0 '{names[2]}', but version 1 was published with '{names[2]}' as class 2" in output, output
    else:
        assert "labels.json is missing, but experience 0 holds labeled samples" in output, output
    assert not (workdir / "labels.json").exists()
