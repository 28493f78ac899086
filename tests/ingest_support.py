"""Shared by the ingestion tests: a service on free loopback ports, small images, raw sockets."""

from __future__ import annotations

import dataclasses
import socket
import time

import numpy as np
import zmq

from cl_agent.config import ExperienceSection, IngestSection, ReservoirSection, SpoolSection, WireSection
from cl_agent.ingest import IngestService


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_service(workdir, *, ingest: dict | None = None, wire: dict | None = None, spool: dict | None = None,
                 reservoir: dict | None = None, experience: dict | None = None) -> IngestService:
    """An IngestService bound to free loopback ports (not started)."""
    ingest_section = IngestSection(
        labeled_endpoint="tcp://127.0.0.1:0",
        frame_endpoint="tcp://127.0.0.1:0",
        control_endpoint="tcp://127.0.0.1:0",
        wire=dataclasses.replace(WireSection(), **(wire or {})),
    )
    ingest_section = dataclasses.replace(ingest_section, **(ingest or {}))
    return IngestService(
        ingest_section,
        dataclasses.replace(SpoolSection(), **(spool or {})),
        dataclasses.replace(ReservoirSection(), **(reservoir or {})),
        dataclasses.replace(ExperienceSection(), **({"labeled_samples": 10_000, **(experience or {})})),
        workdir,
    )


def images(n: int, size: int = 16, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]


def request(endpoint: str, parts: list[bytes], timeout_s: float = 5.0, kind: int = zmq.DEALER) -> dict:
    """Send raw parts through a fresh DEALER (with the REQ-style empty delimiter) and return the reply header."""
    import json

    ctx = zmq.Context.instance()
    sock = ctx.socket(kind)
    sock.linger = 0
    sock.connect(endpoint)
    try:
        sock.send_multipart(([b""] if kind == zmq.DEALER else []) + parts)
        if not sock.poll(timeout_s * 1000):
            raise TimeoutError(f"no reply from {endpoint}")
        reply = sock.recv_multipart()
    finally:
        sock.close()
    return json.loads(reply[-1])


def wait_until(predicate, timeout_s: float = 10.0, interval_s: float = 0.01) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout_s`` passes (its last value)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def send_accepted_frame(service, client, accepted: int) -> None:
    """Send one frame, then wait until ``service`` has accepted ``accepted`` frames in all."""
    client.send(images(1, 16)[0])
    assert wait_until(lambda: service.counters()["frames_accepted"] >= accepted, 5.0)


def send_two_streams_under_one_id(service, first, second) -> int:
    """Frames from two clients of one sender id: ``first`` 10 frames ahead, then the two alternating, one frame
    at a time, 8 times; each frame accepted before the next. Returns the frames accepted."""
    accepted = 0
    for _ in range(10):
        accepted += 1
        send_accepted_frame(service, first, accepted)
    for _ in range(8):
        for client in (first, second):
            accepted += 1
            send_accepted_frame(service, client, accepted)
    return accepted


def write_video(path, frames: int, width: int = 64, height: int = 48):
    """An MJPG video of ``frames`` test images at width x height; skips the test where OpenCV cannot write one."""
    import cv2
    import pytest

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (width, height))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for image in images(frames, 1):
        writer.write(cv2.resize(image, (width, height)))
    writer.release()
    return path
