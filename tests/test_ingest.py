"""The ingestion service over real loopback sockets: acks, nacks per reason, idempotency, frames, experiences."""

import json
import time

import cv2
import numpy as np
import zmq

from cl_agent.client import FrameClient, LabeledClient
from cl_agent.experience import ExperienceStore
from cl_agent.spool import read_records
from cl_agent.wire import encode_message, pack_message, reply
from ingest_support import images, make_service, request, wait_until


def test_labeled_batch_is_acked_stored_and_cut(tmp_path):
    with make_service(tmp_path) as service:
        client = LabeledClient(service.endpoints["labeled"], "robot")
        batch = images(4, seed=3)
        ack = client.send(batch, ["cat", "dog", "cat", 7], encoding="png")  # id 7 first reserves 0..7
        assert ack.ok and ack.accepted == 4 and not ack.duplicate and ack.experience == 0
        assert service.end_experience() == 0
        assert service.end_experience() is None  # nothing new to cut
        counters = service.counters()
        client.close()
    assert counters["labeled_images_acked"] == 4 and counters["experiences_cut"] == 1
    labeled, labels, unlabeled = ExperienceStore(tmp_path).load(0).decode(16)
    assert np.array_equal(labeled, np.stack(batch))
    assert labels.tolist() == [8, 9, 8, 7] and unlabeled.shape == (0, 16, 16, 3)


def _png(side: int) -> bytes:
    return cv2.imencode(".png", np.zeros((side, side, 3), np.uint8))[1].tobytes()


_SEQ = iter(range(1000, 10**6))


def _labeled(payloads, labels, sides, encoding="png", **fields):
    return pack_message("labeled", "s", next(_SEQ), payloads, encoding=encoding, shapes=[[s, s, 3] for s in sides], labels=labels, **fields)


def _relabeled(parts, labels):
    """``parts`` with the header's labels replaced (as a sender not using pack_message could write them)."""
    header = json.loads(parts[0])
    header["labels"] = labels
    return [json.dumps(header).encode(), *parts[1:]]


SMALL = _png(8)
CASES = {
    "too_many_parts": lambda: _labeled([SMALL] * 5, ["a"] * 5, [8] * 5),
    "part_too_large": lambda: _labeled([SMALL + b"\x00" * 5000], ["a"], [8]),
    "message_too_large": lambda: _labeled([SMALL + b"\x00" * 3000] * 4, ["a"] * 4, [8] * 4),
    "header_too_large": lambda: _labeled([SMALL], ["a"], [8], note="x" * 2000),
    "bad_json": lambda: [b"{oops", SMALL],
    "bad_version": lambda: [json.dumps({"v": 0, "kind": "labeled", "sender": "s", "seq": 1}).encode(), SMALL],
    "image_too_large": lambda: _labeled([_png(100)], ["a"], [100]),
    "shape_mismatch": lambda: _labeled([SMALL], ["a"], [9]),
    "bad_encoding": lambda: encode_message("labeled", "s", 1, images(1, 8), encoding="raw", labels=["a"]),
    "label_count_mismatch": lambda: _labeled([SMALL, SMALL], ["a"], [8, 8]),
    "bad_label": lambda: _relabeled(_labeled([SMALL], ["a"], [8]), [-1]),  # pack_message itself refuses -1
    "bad_class_id": lambda: _labeled([SMALL], [3], [8]),
    "too_many_classes": lambda: _labeled([SMALL] * 3, ["x", "y", "z"], [8] * 3),
    "unexpected_kind": lambda: pack_message("frame", "s", 5, [SMALL], encoding="png", shapes=[[8, 8, 3]]),
}


def test_every_limit_is_refused_with_its_reason_and_the_agent_carries_on(tmp_path):
    wire = dict(max_parts=5, max_part_bytes=4000, max_message_bytes=12_000, max_header_bytes=1024,
                max_image_side=64, encodings=["jpeg", "png"])
    with make_service(tmp_path, wire=wire, spool={"max_classes": 3}) as service:
        endpoint = service.endpoints["labeled"]
        assert request(endpoint, _labeled([SMALL], ["first"], [8]))["kind"] == "ack"
        for expected, make in CASES.items():
            parts = make()
            answer = request(endpoint, parts)
            assert answer["kind"] == "nack" and answer["reason"] == expected, (expected, answer)
            assert answer["detail"]
            # A nack carries the request's seq whenever its header could be read (docs/protocol.md).
            sent_seq = 0 if expected == "bad_json" else json.loads(parts[0])["seq"]
            assert answer["seq"] == sent_seq, (expected, answer)
        # Garbage of every shape on every socket: counted, answered where possible, never fatal.
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.connect(service.endpoints["frames"])
        rng = np.random.default_rng(0)
        for i in range(50):
            push.send_multipart([rng.bytes(int(rng.integers(0, 300))) for _ in range(int(rng.integers(1, 4)))])
        push.close(linger=1000)
        assert wait_until(lambda: service.counters()["frames_received"] == 50)
        answer = request(endpoint, _labeled([SMALL, SMALL], ["first", 1], [8, 8]))
        assert answer["kind"] == "ack" and answer["accepted"] == 2
        counters = service.counters()
    for reason in CASES:
        assert counters["rejected"][reason] >= 1, reason
    assert counters["frames_rejected"] == 50 and counters["labeled_nacked"] == len(CASES)
    assert counters["labeled_images_acked"] == 3


def test_spool_limit_gives_a_nack_never_a_false_ack(tmp_path):
    with make_service(tmp_path, spool={"max_bytes": 3000}) as service:
        client = LabeledClient(service.endpoints["labeled"], "s", window=1)
        answers = [client.send_encoded([SMALL * 4], [[8, 8, 3]], ["a"], encoding="png") for _ in range(20)]
        client.close()
    acked = [a.seq for a in answers if a.ok]
    refused = [a for a in answers if not a.ok]
    assert acked and refused and all(a.reason == "spool_full" for a in refused)
    stored = [r.seq for _, r in read_records(tmp_path / "spool" / "labeled-000000.log")]
    assert stored == acked


def test_retry_is_stored_once_and_acked_again_also_after_restart(tmp_path):
    parts = encode_message("labeled", "robot-7", 42, images(2), labels=["a", "b"])
    with make_service(tmp_path) as service:
        first = request(service.endpoints["labeled"], parts)
        second = request(service.endpoints["labeled"], parts)
        # Both copies in one group commit: the second is a duplicate of a not-yet-durable record.
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(service.endpoints["labeled"])
        other = encode_message("labeled", "robot-7", 43, images(1), labels=["a"])
        for _ in range(3):
            sock.send_multipart([b"", *other])
        answers = [json.loads(sock.recv_multipart()[-1]) for _ in range(3)]
        sock.close(linger=0)
    assert first["kind"] == "ack" and not first["duplicate"]
    assert second["kind"] == "ack" and second["duplicate"] and second["seq"] == 42
    assert [a["duplicate"] for a in answers].count(False) == 1 and all(a["kind"] == "ack" for a in answers)
    with make_service(tmp_path) as service:
        again = request(service.endpoints["labeled"], parts)
    assert again["kind"] == "ack" and again["duplicate"]
    stored = [(r.sender, r.seq) for _, r in read_records(tmp_path / "spool" / "labeled-000000.log")]
    assert stored == [("robot-7", 42), ("robot-7", 43)]


def test_frames_enter_a_bounded_reservoir_and_gaps_count_as_drops(tmp_path):
    with make_service(tmp_path, reservoir={"capacity": 5}) as service:
        with FrameClient(service.endpoints["frames"], "cam") as frames:
            assert wait_until(lambda: frames.send(images(1, 32)[0]))
            for image in images(29, 32):
                while not frames.send(image):
                    time.sleep(0.001)
            assert wait_until(lambda: service.counters()["frames_accepted"] == 30)
        counters = service.counters()
        assert counters["reservoir_frames"] == 5 and counters["frames_kept"] >= 5
        # Frames the client could not queue still used a seq: the agent saw them as drops.
        assert counters["frames_dropped"] == frames.dropped
        before = counters["frames_dropped"]
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(service.endpoints["frames"])
        for seq in (0, 10):
            push.send_multipart(encode_message("frame", "gappy", seq, images(1, 8)))
        push.close(linger=1000)
        assert wait_until(lambda: service.counters()["frames_dropped"] == before + 9)
        assert len(service.reservoir) == 5


def test_experiences_cut_by_count_time_and_explicit_end_and_numbering_survives_restart(tmp_path):
    experience = {"labeled_samples": 8, "max_wait_s": 0.4, "min_samples": 3, "unlabeled_samples": 3}
    with make_service(tmp_path, experience=experience) as service:
        frames = FrameClient(service.endpoints["frames"], "cam")
        assert wait_until(lambda: frames.send(images(1, 32)[0]) and service.counters()["frames_kept"] > 0)
        client = LabeledClient(service.endpoints["labeled"], "s")
        client.send(images(4), ["a"] * 4)
        client.send(images(4), ["b"] * 4)
        assert wait_until(lambda: service.store.last_index == 0)
        client.send(images(2), ["a"] * 2)
        time.sleep(0.6)
        assert service.store.last_index == 0  # old enough, but fewer than min_samples
        client.send(images(1), ["c"])
        assert wait_until(lambda: service.store.last_index == 1)
        client.send(images(1), ["c"])
        control = request(service.endpoints["control"], encode_message("end_experience", "op", 1), kind=zmq.REQ)
        assert control["kind"] == "ack" and control["experience"] == 2
        status = request(service.endpoints["control"], encode_message("status", "op", 2), kind=zmq.REQ)
        assert status["counters"]["experiences_cut"] == 3
        client.close()
        frames.close()
    with make_service(tmp_path, experience=experience) as service:
        client = LabeledClient(service.endpoints["labeled"], "s")
        client.send(images(1), ["a"])
        ack = client.end_experience()
        client.close()
    assert ack.ok and ack.experience == 3
    store = ExperienceStore(tmp_path)
    metas = [store.meta(i) for i in store.pending()]
    assert [m["cut_reason"] for m in metas] == ["count", "time", "explicit", "explicit"]
    assert [m["labeled_samples"] for m in metas] == [8, 3, 1, 1]
    assert metas[0]["unlabeled_samples"] >= 1 and metas[0]["classes"] == [0, 1]
    assert metas[3]["unlabeled_samples"] >= 1  # the reservoir is saved at a clean stop and restored at the start


def test_router_replies_reach_req_senders(tmp_path):
    with make_service(tmp_path) as service:
        answer = request(service.endpoints["labeled"], encode_message("labeled", "req", 1, images(1), labels=["a"]), kind=zmq.REQ)
    assert answer["kind"] == "ack"


def test_reply_is_single_part():
    assert len(reply("ack", "agent", 1, accepted=3)) == 1


def test_end_experience_acks_are_counted_as_accepted_control_messages(tmp_path):
    with make_service(tmp_path) as service:
        client = LabeledClient(service.endpoints["labeled"], "s")
        client.send(images(1), ["a"])
        assert client.end_experience().ok  # on the labeled socket
        client.send(images(1), ["a"])
        control = request(service.endpoints["control"], encode_message("end_experience", "op", 7), kind=zmq.REQ)
        assert control["kind"] == "ack" and control["seq"] == 7
        refused = request(service.endpoints["control"], encode_message("end_experience", "op", 8), kind=zmq.REQ)
        assert refused["kind"] == "nack" and refused["reason"] == "nothing_to_cut" and refused["seq"] == 8
        # A refused control message with a readable header names its seq too.
        wrong = request(service.endpoints["control"], pack_message("labeled", "op", 9, [], bogus=1), kind=zmq.REQ)
        assert wrong["kind"] == "nack" and wrong["seq"] == 9
        client.close()
        counters = service.counters()
    assert counters["control_accepted"] == 2 and counters["experiences_cut"] == 2
    assert counters["rejected"]["nothing_to_cut"] == 1


def test_ingest_command_logs_iso_8601_utc_times(tmp_path):
    import re
    import signal
    import subprocess
    import sys

    settings = [f"agent.workdir={tmp_path / 'work'}", "ingest.labeled_endpoint=tcp://127.0.0.1:0",
                "ingest.frame_endpoint=tcp://127.0.0.1:0", "ingest.control_endpoint=tcp://127.0.0.1:0"]
    command = [sys.executable, "-m", "cl_agent", "ingest"] + [arg for s in settings for arg in ("--set", s)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = json.loads(process.stdout.readline())
        assert ready["event"] == "ingest_ready", ready
        client = LabeledClient(ready["endpoints"]["labeled"], "s")
        client.send(images(1), ["a"])
        assert client.end_experience().ok  # logs "experience 0 cut"
        client.close()
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=20)
    cut = [line for line in stderr.splitlines() if "experience 0 cut" in line]
    assert cut, stderr
    assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO cl_agent\.ingest: ", cut[0]), cut[0]
    # a person reading the log sees where it listens and what it took, as the stdout JSON says for tools
    assert f"ingest listening (no training; Ctrl-C stops): labeled={ready['endpoints']['labeled']}" in stderr
    assert "ingest stopped: labeled images acked 1 (messages refused 0), frames received 0, kept 0, experiences cut 1" in stderr


def test_each_cut_saves_the_keys_so_far_and_a_restart_recognises_retries_from_them(tmp_path):
    first = encode_message("labeled", "robot-7", 42, images(1), labels=["a"])
    later = encode_message("labeled", "robot-7", 43, images(1), labels=["a"])
    with make_service(tmp_path) as service:
        assert request(service.endpoints["labeled"], first)["kind"] == "ack"
        assert service.end_experience() == 0
        assert request(service.endpoints["labeled"], later)["kind"] == "ack"  # committed, not cut
        summary = json.loads((tmp_path / "experiences" / "keys.json").read_text())
        assert summary == {"through": 0, "runs": {"robot-7": [[42, 42]]}}
        assert service.end_experience() == 1
        summary = json.loads((tmp_path / "experiences" / "keys.json").read_text())
        assert summary == {"through": 1, "runs": {"robot-7": [[42, 43]]}}
    with make_service(tmp_path) as service:
        again = [request(service.endpoints["labeled"], parts) for parts in (first, later)]
        fresh = request(service.endpoints["labeled"], encode_message("labeled", "robot-7", 44, images(1), labels=["a"]))
    assert [a["duplicate"] for a in again] == [True, True] and not fresh["duplicate"]
