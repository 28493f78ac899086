"""`cl-agent run` end to end, as a real process on loopback sockets with a tiny model."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from agent_harness import AgentProcess, send_experience, shut_down, tiny_agent_config, wait_for_version, wait_served
from cl_agent.cli import app
from cl_agent.client import FrameClient, LabeledClient
from cl_agent.experience import ExperienceStore
from cl_agent.inference import InferenceClient
from cl_agent.repository import ModelRepository
from cl_agent.status import read_experience_records, read_state


def test_agent_learns_publishes_serves_and_survives_kill9(tmp_path):
    cfg, path = tiny_agent_config(tmp_path, **{"spool.keep_trained_bytes": 0})  # trained data deleted as it goes
    rng = np.random.default_rng(0)
    agent = AgentProcess(path, tmp_path / "agent.log")
    labeled = LabeledClient(cfg.ingest.labeled_endpoint, "test-labeler", timeout_s=5.0, retries=10)
    frames = FrameClient(cfg.ingest.frame_endpoint, "test-camera")
    acked = 0
    try:
        # experience 0: learned, exported, published, served
        acked += send_experience(labeled, [0, 1], 16, rng, frames)
        assert wait_for_version(cfg, 1, 180, agent) == 1
        inference = InferenceClient(cfg.serve.endpoint, timeout_s=5.0, retries=10)
        wait_served(inference, 1)

        # experience 1 arrives; the agent is killed while it trains, then restarted
        acked += send_experience(labeled, [1, 2], 16, rng, frames)
        time.sleep(1.0)
        agent.kill9()
        agent = AgentProcess(path, tmp_path / "agent.log")
        assert wait_for_version(cfg, 2, 180, agent) == 2

        # experience 2 after the restart; the same client reconnects by itself
        acked += send_experience(labeled, [3, 0], 16, rng)
        assert wait_for_version(cfg, 3, 180, agent) == 3
        wait_served(inference, 3)
        inference.close()

        deadline = time.monotonic() + 60  # the agent asks its hosted server which version it serves
        while (read_state(cfg.agent.workdir) or {}).get("served_version") != 3:
            assert time.monotonic() < deadline, "the agent never saw its server move to version 3"
            time.sleep(0.2)
        result = CliRunner().invoke(app, ["status", "--workdir", cfg.agent.workdir])
        assert result.exit_code == 0, result.output
        assert "running" in result.output.lower()
        assert agent.terminate(cfg.agent.grace_period_s + 10) == 0
    finally:
        shut_down(agent, labeled, frames)

    # every acked labeled sample is in exactly one experience, each experience trained once
    store = ExperienceStore(cfg.agent.workdir)
    assert store.indices() == [0, 1, 2] and store.pending() == []
    assert sum(store.meta(i)["labeled_samples"] for i in store.indices()) == acked == 96
    # retention deleted the data of the experiences trained well before the end (the last may have been too recent)
    assert store.is_pruned(0) and store.is_pruned(1)
    assert not (store.spool_dir / store.meta(0)["labeled_segment"]).exists()
    records = read_experience_records(cfg.agent.workdir)
    trained = [i for r in records for i in r["merged"]]
    assert sorted(trained) == [0, 1, 2], "an experience was trained twice or never"
    assert records[0]["online_accuracy"] is not None
    # versions only increase and each one is complete
    repository = ModelRepository(cfg.repository.root, cfg.agent.model_name)
    assert repository.versions() == [1, 2, 3]
    for version in repository.versions():
        repository.verify(version)
    assert [repository.load_manifest(v)["experience_index"] for v in (1, 2, 3)] == [0, 1, 2]
    state = read_state(cfg.agent.workdir)
    assert state["status"] == "stopped" and state["model_version"] == 3
    assert json.loads(json.dumps(state))  # plain JSON


def test_second_agent_on_the_same_workdir_is_refused(tmp_path):
    from cl_agent.agent import Agent
    from cl_agent.errors import CLAgentError

    cfg, _ = tiny_agent_config(tmp_path)
    first = Agent(cfg)
    first._lock()
    with pytest.raises(CLAgentError, match="another agent"):
        Agent(cfg)._lock()


def _trainer_pid(agent: AgentProcess, workdir) -> int | None:
    """The agent's child that holds trainer.log open."""
    import os

    log_file = os.path.realpath(os.path.join(workdir, "trainer.log"))
    for pid in agent.children():
        try:
            if any(os.path.realpath(os.path.join(f"/proc/{pid}/fd", fd)) == log_file for fd in os.listdir(f"/proc/{pid}/fd")):
                return pid
        except OSError:  # exited meanwhile
            continue
    return None


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/fd"), reason="finds the trainer through /proc")
def test_a_killed_trainer_is_replaced_reports_through_its_own_channel_and_the_agent_still_stops(tmp_path):
    import os
    import signal

    cfg, path = tiny_agent_config(tmp_path)
    rng = np.random.default_rng(1)
    agent = AgentProcess(path, tmp_path / "agent.log")
    labeled = LabeledClient(cfg.ingest.labeled_endpoint, "test-labeler", timeout_s=5.0, retries=10)
    try:
        send_experience(labeled, [0, 1], 16, rng)
        assert wait_for_version(cfg, 1, 180, agent) == 1
        first = _trainer_pid(agent, cfg.agent.workdir)
        assert first is not None
        time.sleep(0.5)  # idle: its watch thread is waiting for the stop signal
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _trainer_pid(agent, cfg.agent.workdir) in (None, first):
            assert time.monotonic() < deadline, "the trainer was not restarted"
            time.sleep(0.2)

        send_experience(labeled, [2, 3], 16, rng)  # the new trainer learns, and the agent hears of it
        assert wait_for_version(cfg, 2, 180, agent) == 2
        deadline = time.monotonic() + 30
        while (read_state(cfg.agent.workdir) or {}).get("last_experience") != 1:
            assert time.monotonic() < deadline, "the agent never heard of the new trainer's update"
            time.sleep(0.2)
        started = time.monotonic()
        assert agent.terminate(cfg.agent.grace_period_s + 10) == 0
        assert time.monotonic() - started < cfg.agent.grace_period_s
    finally:
        shut_down(agent, labeled)
    state = read_state(cfg.agent.workdir)
    assert state["status"] == "stopped" and state["model_version"] == 2 and state["last_experience"] == 1


def _dead_trainer(code: int):
    """A real child process that has already exited with ``code`` (what _supervise finds after a crash)."""
    import multiprocessing as mp
    import os

    process = mp.get_context("fork").Process(target=os._exit, args=(code,))
    process.start()
    process.join(10)
    return process


def test_a_trainer_crash_counts_as_a_trainer_failure_not_a_publish_failure(tmp_path):
    import queue

    from cl_agent.agent import Agent
    from cl_agent.metrics import AgentMetrics

    cfg, _ = tiny_agent_config(tmp_path)
    agent = Agent(cfg)
    metrics = AgentMetrics()
    agent.results = queue.Queue()  # what the dead trainer put before it exited
    agent.results.put({"error": "RuntimeError: out of memory"})
    agent.trainer = _dead_trainer(1)
    agent._supervise({}, metrics, None)

    assert agent.results.empty()
    assert metrics.value("trainer_failures_total") == 1
    assert metrics.value("publish_failures_total") == 0
    assert "trainer" in agent._restart_at  # restarted (after its pause), not stopped


def test_a_refused_export_counts_as_a_publish_failure_and_keeps_the_published_version(tmp_path):
    """The trainer reports a trained experience whose export was refused: no crash, no new version."""
    import queue

    from cl_agent.agent import Agent
    from cl_agent.metrics import AgentMetrics

    cfg, _ = tiny_agent_config(tmp_path)
    agent = Agent(cfg)
    metrics = AgentMetrics()
    agent.results = queue.Queue()
    record = {
        "experience": 4, "merged": [4], "labeled": 16, "unlabeled": 8, "online_accuracy": 0.5, "losses": {"total": 1.0},
        "update_seconds": 2.0, "export_seconds": 0.5, "version": None, "recovered": False,
        "publish_error": "parity check failed: top-1 differs from torch on 3 of 8 images",
    }
    agent.results.put(record)
    state = {"model_version": 3}
    agent._drain_results(state, metrics, None)

    assert state["model_version"] == 3 and state["last_experience"] == 4
    assert metrics.value("publish_failures_total") == 1
    assert metrics.value("trainer_failures_total") == 0
    assert metrics.value("experiences_trained_total") == 1



def test_a_restarted_agent_shows_the_version_published_before_it_started(tmp_path):
    import io
    import signal
    import threading

    from cl_agent.agent import Agent
    from cl_agent.console import LiveView

    cfg, _ = tiny_agent_config(tmp_path, **{"agent.host_server": False, "agent.grace_period_s": 10.0})
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read here")
    ModelRepository(cfg.repository.root, cfg.agent.model_name).publish(
        model, {"class_names": ["a", "b"], "image_size": 16, "experience_index": 0}
    )
    view = LiveView(io.StringIO(), interval_s=60.0)
    agent = Agent(cfg, view)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stopper = threading.Timer(1.0, agent.stop_requested.set)
    stopper.start()
    try:
        agent.run()
    finally:
        stopper.cancel()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    assert "model   published v1  served unknown" in view.lines()
    assert "none published yet" not in view.stream.getvalue()


class _StoppedIngest:
    def stop(self) -> None:
        pass


def _child(target, *args):
    import multiprocessing as mp

    process = mp.get_context("fork").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def _ignores_the_stop(_stop_pipe) -> None:  # a trainer still exporting: it looks at the stop pipe only between steps
    time.sleep(60)


def _stops_when_told(stop_pipe) -> None:
    stop_pipe.poll(60)


@pytest.mark.parametrize("stubborn", [True, False])
def test_a_trainer_still_busy_past_the_grace_period_is_killed_at_stop(tmp_path, stubborn):
    import multiprocessing as mp
    import signal

    from cl_agent.agent import Agent
    from cl_agent.config import load_config
    from cl_agent.metrics import AgentMetrics
    from cl_agent.status import initial_state

    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path), "agent.grace_period_s": 1.0}))
    child_end, agent.trainer_stop = mp.Pipe(duplex=False)
    agent.trainer = _child(_ignores_the_stop if stubborn else _stops_when_told, child_end)
    state = initial_state()
    started = time.monotonic()
    agent._shutdown(_StoppedIngest(), state, None, AgentMetrics(), None)
    waited = time.monotonic() - started
    assert not agent.trainer.is_alive() and state["status"] == "stopped"
    assert read_state(tmp_path)["status"] == "stopped"
    if stubborn:
        assert agent.trainer.exitcode == -signal.SIGKILL  # killed, not left running
        assert waited >= 1.0  # only after the grace period
        # its update is redone by the next start, from the last complete checkpoint
        # (see test_agent_learns_publishes_serves_and_survives_kill9)
    else:
        assert agent.trainer.exitcode == 0  # stopped within the grace period: not killed
