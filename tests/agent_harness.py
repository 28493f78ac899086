"""Start a real ``cl-agent run`` child process on free loopback ports, with a tiny model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cl_agent.config import load_config, save_resolved
from cl_agent.repository import ModelRepository
from cl_agent.synthetic import CLASS_NAMES, make_batch

IMAGE_SIZE = 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_agent_config(tmp_path: Path, **extra):
    ports = {n: free_port() for n in ("labeled", "frame", "control", "announce", "fetch", "serve")}
    overrides = {
        "agent.workdir": str(tmp_path / "agent"),
        "agent.device": "cpu",
        "agent.grace_period_s": 20.0,
        "ingest.labeled_endpoint": f"tcp://127.0.0.1:{ports['labeled']}",
        "ingest.frame_endpoint": f"tcp://127.0.0.1:{ports['frame']}",
        "ingest.control_endpoint": f"tcp://127.0.0.1:{ports['control']}",
        "repository.root": str(tmp_path / "models"),
        "repository.announce_endpoint": f"tcp://127.0.0.1:{ports['announce']}",
        "repository.fetch_endpoint": f"tcp://127.0.0.1:{ports['fetch']}",
        "serve.endpoint": f"tcp://127.0.0.1:{ports['serve']}",
        "serve.poll_s": 0.2,
        "serve.intra_op_threads": 1,
        "metrics.port": 0,
        "metrics.console": False,
        "metrics.state_interval_s": 0.5,
        "experience.labeled_samples": 10_000,
        "experience.max_wait_s": 3600.0,
        "experience.unlabeled_samples": 16,
        "model.backbone": "test_resnet",
        "model.num_classes": len(CLASS_NAMES),
        "model.image_size": IMAGE_SIZE,
        "train.labeled_batch": 16,
        "train.unlabeled_batch": 8,
        "train.rotation_images": 4,
        "train.memory_batch": 4,
        "train.epochs_base": 2,
        "train.epochs_min": 2,
        "train.augment": False,
        "export.parity_samples": 4,
        **extra,
    }
    cfg = load_config(None, overrides)
    path = save_resolved(cfg, tmp_path / "agent.yaml")
    return cfg, path


class AgentProcess:
    def __init__(self, config_path: Path, log_path: Path):
        self.log = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cl_agent", "run", "--config", str(config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout_s: float) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()


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
