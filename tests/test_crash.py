"""`cl-agent ingest` as a real process: kill -9 while a client streams acked batches, and a full disk.

Every acked sample must be on disk exactly once after the restart; a write the
disk cannot take is a negative ack, never an ack.
"""

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from cl_agent.client import AgentUnavailable, LabeledClient
from cl_agent.spool import read_records
from ingest_support import free_port


def _config(tmp_path: Path, **experience) -> Path:
    config = {
        "agent": {"workdir": str(tmp_path / "agent")},
        "ingest": {
            "labeled_endpoint": f"tcp://127.0.0.1:{free_port()}",
            "frame_endpoint": f"tcp://127.0.0.1:{free_port()}",
            "control_endpoint": f"tcp://127.0.0.1:{free_port()}",
        },
        "experience": {"labeled_samples": 10_000, **experience},
    }
    path = tmp_path / "ingest.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path, preexec_fn=None) -> tuple[subprocess.Popen, dict]:
    process = subprocess.Popen(
        [sys.executable, "-m", "cl_agent.cli", "ingest", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=preexec_fn,
    )
    line = process.stdout.readline()
    if not line:
        process.kill()
        raise RuntimeError(f"cl-agent ingest exited with {process.wait()} before it was ready")
    ready = json.loads(line)
    assert ready["event"] == "ingest_ready"
    return process, ready["endpoints"]


def _batch(index: int) -> tuple[list[bytes], list[list[int]], list[str]]:
    """Four raw 4x4 images whose pixels name the batch, so stored bytes can be matched to acks."""
    payloads = [np.full((4, 4, 3), (index * 4 + i) % 251, np.uint8).tobytes() for i in range(4)]
    return payloads, [[4, 4, 3]] * 4, [f"class-{(index + i) % 6}" for i in range(4)]


def _check_full_disk_answers(answers: list, workdir: Path) -> None:
    """Some messages acked, the others refused disk_full, and the spool holds exactly the acked ones."""
    acked = sorted(a.seq for a in answers if a.ok)
    refused = [a for a in answers if not a.ok]
    assert acked and refused
    assert {a.reason for a in refused} == {"disk_full"}
    assert sorted(r.seq for r in _stored(workdir)) == acked


def _stored(workdir: Path) -> list:
    records = []
    for segment in sorted((workdir / "spool").glob("labeled-*.log")):
        records += [r for _, r in read_records(segment)]
    return records


def test_kill_9_while_streaming_loses_no_acked_sample_and_stores_each_once(tmp_path):
    config = _config(tmp_path, labeled_samples=60)  # experiences are cut while streaming, too
    process, endpoints = _start(config)
    client = LabeledClient(endpoints["labeled"], "robot", timeout_s=0.5, retries=40, window=4)
    sent: dict[int, list[bytes]] = {}
    acked: set[int] = set()
    stop = threading.Event()
    errors: list[BaseException] = []

    def stream():
        try:
            index = 0
            while not stop.is_set():
                payloads, shapes, labels = _batch(index)
                seq = client.submit_encoded(payloads, shapes, labels, encoding="raw")
                sent[seq] = payloads
                for ack in client.poll_acks():
                    assert ack.ok, ack
                    acked.add(ack.seq)
                index += 1
            for ack in client.flush():
                assert ack.ok, ack
                acked.add(ack.seq)
        except (AgentUnavailable, AssertionError) as e:
            errors.append(e)

    thread = threading.Thread(target=stream)
    thread.start()
    try:
        for _ in range(2):  # two crashes in one run
            deadline = time.monotonic() + 20
            start = len(acked)
            while len(acked) < start + 25 and time.monotonic() < deadline:
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            time.sleep(0.2)
            process, endpoints = _start(config)
        deadline = time.monotonic() + 20
        start = len(acked)
        while len(acked) < start + 25 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(30)
        process.send_signal(signal.SIGTERM)
        process.wait(20)
        client.close()
    assert not errors, errors
    # (client.reconnects is not asserted: a batch queued while the agent restarts may be delivered
    # by ZeroMQ's own reconnect without any request timing out)
    assert len(acked) >= 75
    records = _stored(tmp_path / "agent")
    keys = [(r.sender, r.seq) for r in records]
    assert len(keys) == len(set(keys)), "a message was stored twice"
    by_seq = {r.seq: r for r in records}
    for seq in acked:
        assert seq in by_seq, f"acked message {seq} lost"
        assert by_seq[seq].payloads == sent[seq]
    # Experiences were cut across the crashes and numbered without gaps.
    names = sorted(p.name for p in (tmp_path / "agent" / "experiences").iterdir())
    experiences = [name for name in names if name.isdigit()]
    assert experiences == [f"{i:06d}" for i in range(len(experiences))] and len(experiences) >= 3
    # The key summary, and nothing half written by a killed process (a restart removes it).
    assert names == [*experiences, "keys.json"], names


def _limit_file_size(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past it fail with EFBIG

    return apply


def test_full_disk_gives_negative_acks_and_the_agent_keeps_running(tmp_path):
    config = _config(tmp_path)
    process, endpoints = _start(config, preexec_fn=_limit_file_size(60_000))
    try:
        client = LabeledClient(endpoints["labeled"], "robot", timeout_s=2, retries=2, window=1)
        payload = bytes(range(256)) * 12  # 3 KB of raw pixels: 32x32x3 = 3072 bytes
        answers = [client.send_encoded([payload], [[32, 32, 3]], ["a"], encoding="raw") for _ in range(30)]
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    _check_full_disk_answers(answers, tmp_path / "agent")


def test_full_disk_under_a_window_of_eight_stores_every_acked_message(tmp_path):
    """Several messages share a commit: a write failing after earlier ones of its group refuses only itself."""
    config = _config(tmp_path)
    settings = yaml.safe_load(config.read_text())
    settings["spool"] = {"group_commit_ms": 20}
    config.write_text(yaml.safe_dump(settings))
    process, endpoints = _start(config, preexec_fn=_limit_file_size(60_000))
    try:
        client = LabeledClient(endpoints["labeled"], "robot", timeout_s=3, retries=2, window=8)
        payload = bytes(range(256)) * 12  # 3 KB of raw pixels: 32x32x3 = 3072 bytes
        for _ in range(40):
            client.submit_encoded([payload], [[32, 32, 3]], ["a"], encoding="raw")
        answers = client.flush()
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    assert len(answers) == 40
    _check_full_disk_answers(answers, tmp_path / "agent")
