"""Ingestion throughput: durable labeled acks, accepted camera frames, and bare pyzmq on the same payloads.

Runs `cl-agent ingest` as a separate process on loopback and drives it from this one:

    python tools/bench_ingest.py --json

labeled_images_per_s: 64x64 JPEG, 32 images per message, counted when the durable ack arrives.
frames_per_s:         640x480 JPEG frames (one per message) accepted into the reservoir (still encoded).
raw_zmq_images_per_s: the same labeled messages through a bare pyzmq PUSH -> PULL pair into another process
                      (no validation, no disk); raw_zmq_frames_per_s: the same for the frame messages.
frame_client_*:       the same frames sent by the project's FrameClient at --client-rate frames/s (what the agent
                      accepted, the share dropped, the cost of one send).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import yaml
import zmq

from cl_agent.client import LabeledClient
from cl_agent.wire import encode_message, pack_message


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def camera_like(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth scene with texture and noise: compresses like a camera frame, not like flat colour or pure noise."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    image = np.stack([127 + 100 * np.sin(x / (17 + 7 * c) + y / (23 + 5 * c) + phase[c]) for c in range(3)], axis=2)
    image += rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def labeled_messages(count: int, rng: np.random.Generator) -> list[tuple[list[bytes], list[list[int]], list[str]]]:
    batches = []
    for _ in range(count):
        payloads = [cv2.imencode(".jpg", camera_like(64, 64, rng), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes() for _ in range(32)]
        labels = [f"class-{int(c)}" for c in rng.integers(0, 50, 32)]
        batches.append((payloads, [[64, 64, 3]] * 32, labels))
    return batches


def start_ingest(workdir: Path) -> tuple[subprocess.Popen, dict]:
    config = {
        "agent": {"workdir": str(workdir), "log_level": "warning"},
        "ingest": {
            "labeled_endpoint": f"tcp://127.0.0.1:{free_port()}",
            "frame_endpoint": f"tcp://127.0.0.1:{free_port()}",
            "control_endpoint": f"tcp://127.0.0.1:{free_port()}",
        },
        "spool": {"max_bytes": 20_000_000_000},
        "experience": {"labeled_samples": 1_000_000_000, "max_wait_s": 1e9},
    }
    path = workdir / "bench-ingest.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "cl_agent.cli", "ingest", "--config", str(path)], stdout=subprocess.PIPE, text=True
    )
    ready = json.loads(process.stdout.readline())
    return process, ready["endpoints"]


def status(endpoint: str) -> dict:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.linger = 0
    sock.connect(endpoint)
    sock.send_multipart(encode_message("status", "bench", 0))
    if not sock.poll(10_000):
        raise RuntimeError("ingest did not answer a status request")
    answer = json.loads(sock.recv_multipart()[0])
    sock.close()
    return answer["counters"]


def bench_labeled(endpoint: str, batches, window: int, seconds: float) -> float:
    client = LabeledClient(endpoint, "bench", timeout_s=30, retries=1, window=window)
    for payloads, shapes, labels in batches[:4]:  # warm-up: label map, connection
        client.submit_encoded(payloads, shapes, labels)
    client.flush()
    images, i = 0, 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        payloads, shapes, labels = batches[i % len(batches)]
        client.submit_encoded(payloads, shapes, labels)
        i += 1
        for ack in client.poll_acks():
            if not ack.ok:
                raise RuntimeError(f"nack during the benchmark: {ack.reason} {ack.detail}")
            images += ack.accepted
    for ack in client.flush():
        images += ack.accepted
    elapsed = time.perf_counter() - start
    client.close()
    return images / elapsed


def numbered_frames(sender: str, frames: list[bytes]) -> list[tuple[bytes, bytes, bytes]]:
    """Frame messages of one camera as (header before the seq, header after it, payload).

    A camera numbers its frames 0, 1, 2, ... (as FrameClient does); one seq sent over and over reads to the
    agent as two cameras sharing a sender id (a sender clash). The seq is put into a packed header, not
    packed anew per frame: pack_message costs about 6 us, a share of the agent's own time per frame."""
    messages = []
    for frame in frames:
        header, payload = pack_message("frame", sender, 0, [frame], shapes=[[480, 640, 3]])
        head, seq, tail = header.partition(b'"seq":0,')
        if not seq:
            raise RuntimeError(f"no seq in the packed frame header {header[:200]!r}")
        messages.append((head, tail, payload))
    return messages


def bench_frames(endpoints: dict, frames: list[bytes], seconds: float) -> float:
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.sndhwm = 64
    push.connect(endpoints["frames"])
    messages = numbered_frames("bench-cam", frames)
    before = status(endpoints["control"])["frames_accepted"]
    start = time.perf_counter()
    sent = 0
    while time.perf_counter() - start < seconds:
        head, tail, payload = messages[sent % len(messages)]
        # blocks at the high-water mark: no drops, pure throughput
        push.send_multipart([b'%s"seq":%d,%s' % (head, sent, tail), payload], copy=False)
        sent += 1
    # Wait until the agent has taken everything that was sent.
    while status(endpoints["control"])["frames_received"] < sent + before:
        time.sleep(0.01)
    elapsed = time.perf_counter() - start
    accepted = status(endpoints["control"])["frames_accepted"] - before
    push.close()
    return accepted / elapsed


def bench_frame_client(endpoints: dict, frames: list[bytes], seconds: float, rate: float) -> dict:
    """The same frames through the project's FrameClient (the camera side a robot runs), at ``rate`` frames/s.

    FrameClient never blocks: a frame its queue (hwm 64) cannot take is dropped and counted. Sent
    in bursts once a millisecond, as many cameras behind one client would be. Reports the frames
    the agent accepted per second, the share the client dropped, and the mean time of one
    ``send_encoded`` call (packing, the size check, the monitor check every 20 ms, the send).
    """
    from cl_agent.client import FrameClient

    client = FrameClient(endpoints["frames"], "bench-client", hwm=64)
    try:
        if not client.wait_connected(10):
            raise RuntimeError("FrameClient did not connect to the ingest process")
        before = status(endpoints["control"])
        in_send, calls, tick = 0.0, 0, 0.001
        start = time.perf_counter()
        while (now := time.perf_counter()) - start < seconds:
            due = int((now - start) * rate)  # frames the schedule has asked for by now
            while calls < due:
                t = time.perf_counter()
                client.send_encoded(frames[calls % len(frames)], (480, 640, 3))
                in_send += time.perf_counter() - t
                calls += 1
            time.sleep(max(0.0, tick - (time.perf_counter() - now)))
        while status(endpoints["control"])["frames_received"] < before["frames_received"] + client.sent:
            time.sleep(0.01)
        elapsed = time.perf_counter() - start
        accepted = status(endpoints["control"])["frames_accepted"] - before["frames_accepted"]
    finally:
        client.close()
    return {
        "frame_client_rate_per_s": rate,
        "frame_client_frames_per_s": round(accepted / elapsed, 1),
        "frame_client_dropped_pct": round(100 * client.dropped / max(calls, 1), 2),
        "frame_client_send_us_mean": round(1e6 * in_send / max(calls, 1), 2),
    }


def raw_receiver(port: int) -> None:
    """Subprocess side of the bare-pyzmq baseline: PULL, count payload parts, stop at b"END"."""
    pull = zmq.Context.instance().socket(zmq.PULL)
    pull.bind(f"tcp://127.0.0.1:{port}")
    print("ready", flush=True)
    images = 0
    while True:
        parts = pull.recv_multipart(copy=False)
        if len(parts) == 1 and parts[0].bytes == b"END":
            break
        images += len(parts) - 1
    print(images, flush=True)


def bench_raw(messages: list[list[bytes]], seconds: float) -> float:
    """Bare pyzmq: the same multipart messages PUSH -> PULL into another process, no validation, no disk."""
    port = free_port()
    receiver = subprocess.Popen([sys.executable, __file__, "--raw-receiver", str(port)], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout.readline().strip() == "ready"
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.sndhwm = 64
    push.connect(f"tcp://127.0.0.1:{port}")
    start = time.perf_counter()
    sent = 0
    while time.perf_counter() - start < seconds:
        push.send_multipart(messages[sent % len(messages)])
        sent += 1
    push.send(b"END")
    received = int(receiver.stdout.readline())
    elapsed = time.perf_counter() - start
    receiver.wait(10)
    push.close()
    return received / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    parser.add_argument("--window", type=int, default=32, help="labeled messages in flight")
    parser.add_argument("--client-rate", type=float, default=10_000, help="frames/s the FrameClient measurement sends")
    parser.add_argument("--workdir", type=Path, default=None, help="spool folder (default: a temporary folder)")
    parser.add_argument("--raw-receiver", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_receiver is not None:
        return raw_receiver(args.raw_receiver)

    rng = np.random.default_rng(0)
    batches = labeled_messages(64, rng)
    frames = [cv2.imencode(".jpg", camera_like(480, 640, rng), [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes() for _ in range(16)]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    workdir.mkdir(parents=True, exist_ok=True)

    labeled_parts = [pack_message("labeled", "raw", i, p, shapes=sh, labels=lab) for i, (p, sh, lab) in enumerate(batches)]
    frame_parts = [pack_message("frame", "raw", 0, [f], shapes=[[480, 640, 3]]) for f in frames]
    raw = bench_raw(labeled_parts, args.seconds)
    raw_frames = bench_raw(frame_parts, args.seconds)
    process, endpoints = start_ingest(workdir)
    try:
        labeled = bench_labeled(endpoints["labeled"], batches, args.window, args.seconds)
        frames_per_s = bench_frames(endpoints, frames, args.seconds)
        frame_client = bench_frame_client(endpoints, frames, args.seconds, args.client_rate)
        counters = status(endpoints["control"])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
    result = {
        "labeled_images_per_s": round(labeled, 1),
        "frames_per_s": round(frames_per_s, 1),
        "raw_zmq_images_per_s": round(raw, 1),
        "labeled_vs_raw_ratio": round(labeled / raw, 3),
        "raw_zmq_frames_per_s": round(raw_frames, 1),
        "frames_vs_raw_ratio": round(frames_per_s / raw_frames, 3),
        **frame_client,
        "labeled_message": "32 x 64x64 JPEG",
        "labeled_jpeg_bytes_mean": round(float(np.mean([len(p) for b in batches for p in b[0]])), 1),
        "frame_jpeg_bytes_mean": round(float(np.mean([len(f) for f in frames])), 1),
        "fsync_commits": counters["commits"],
        "cpu_count": os.cpu_count(),
        "seconds_per_measurement": args.seconds,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:28s} {value}")


if __name__ == "__main__":
    main()
