"""Start a real ``cl-agent run`` child process on free loopback ports, with a tiny model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cl_agent.config import save_resolved
from cl_agent.demo import TINY, local_config
from cl_agent.errors import CLAgentError
from cl_agent.launcher import AgentProcess
from cl_agent.repository import ModelRepository
from cl_agent.synthetic import CLASS_NAMES, make_batch

IMAGE_SIZE = 16


def tiny_agent_config(tmp_path: Path, **extra):
    cfg = local_config(tmp_path, "cpu", **{**TINY, "agent.grace_period_s": 20.0, **extra})
    return cfg, save_resolved(cfg, tmp_path / "agent.yaml")


def send_experience(client, classes: list[int], per_class: int, rng: np.random.Generator, frames=None) -> int:
    """Send labeled batches (and optionally frames); returns the number of acked labeled images."""
    ids = np.repeat(classes, per_class)
    images = make_batch(ids, rng, IMAGE_SIZE)
    if frames is not None:
        for image in make_batch(rng.choice(classes, size=16), rng, IMAGE_SIZE):
            frames.send(image)
    acked = 0
    for start in range(0, len(ids), 16):
        ack = client.send(images[start : start + 16], [CLASS_NAMES[c] for c in ids[start : start + 16]])
        assert ack.ok, ack
        acked += ack.accepted
    end = client.end_experience()
    assert end.ok, end
    return acked


def wait_for_version(cfg, version: int, timeout_s: float, agent: AgentProcess | None = None) -> int:
    repository = ModelRepository(cfg.repository.root, cfg.agent.model_name)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = repository.latest_version()
        if latest is not None and latest >= version:
            return latest
        if agent is not None and not agent.alive():
            raise AssertionError(f"agent exited with code {agent.process.returncode}")
        time.sleep(0.2)
    raise AssertionError(f"version {version} not published within {timeout_s} s")


def served_version(client) -> int | None:
    try:
        return client.predict(np.zeros((1, 16, 16, 3), np.uint8)).model_version
    except CLAgentError:  # no_model while the server loads its first version, or a timeout under load
        return None


def wait_served(client, version: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while served_version(client) != version:
        assert time.monotonic() < deadline, f"server never moved to version {version}"
        time.sleep(0.2)


def shut_down(agent: AgentProcess, *clients) -> None:
    """A test's clean-up: close its clients, then kill -9 the agent if it is still running."""
    for client in clients:
        client.close()
    if agent.alive():
        agent.kill9()
