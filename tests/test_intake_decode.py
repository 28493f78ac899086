"""Labeled images are decoded in full before the ack: an undecodable one gets the whole message a nack naming it."""

import json
import logging

import cv2
import numpy as np
import pytest

from cl_agent.client import LabeledClient
from cl_agent.codec import WireError, check_decodes
from cl_agent.config import WireSection
from cl_agent.experience import ExperienceStore
from cl_agent.ingest import COUNTER_NAMES
from cl_agent.intake import Counters, LabeledIntake
from cl_agent.labels import LabelMap
from cl_agent.spool import Record, Spool, read_records
from cl_agent.wire import encode_message, pack_message
from ingest_support import images, make_service


def _jpeg(seed: int = 0, side: int = 32) -> bytes:
    return cv2.imencode(".jpg", images(1, side, seed)[0])[1].tobytes()


def _truncated(data: bytes) -> bytes:
    """The headers and half the entropy-coded data: every header check passes, the decode fails."""
    sos = data.find(b"\xff\xda")
    return data[: sos + (len(data) - sos) // 2]


def _intake(tmp_path, wire: WireSection | None = None):
    spool = Spool(tmp_path / "spool", 0, 10**9)
    labels = LabelMap(tmp_path / "labels.json", 10)
    counters = Counters(COUNTER_NAMES)
    return LabeledIntake(spool, labels, wire or WireSection(), counters, lambda: 0), spool, labels, counters


def _answers(replies):
    return [json.loads(r[0]) for r in replies]


def test_a_truncated_jpeg_gets_the_whole_message_refused_and_named(tmp_path):
    intake, spool, labels, counters = _intake(tmp_path)
    good, bad = _jpeg(1), _truncated(_jpeg(2))
    bodies = [
        pack_message("labeled", "cam", 5, [good, bad], shapes=[[32, 32, 3]] * 2, labels=["mug", "new-class"]),
        pack_message("labeled", "cam", 6, [good], shapes=[[32, 32, 3]], labels=["mug"]),
    ]
    refused, acked = _answers(intake.process(bodies))
    assert refused["kind"] == "nack" and refused["seq"] == 5 and refused["reason"] == "decode_failed"
    assert refused["image"] == 1 and refused["detail"].startswith("image 1: jpeg payload of")
    assert acked["kind"] == "ack" and acked["accepted"] == 1
    assert [r.seq for _, r in read_records(spool.segment_path(0))] == [6]  # all or nothing: image 0 is not kept
    assert "new-class" not in labels.names  # refused before any class is added
    snapshot = counters.snapshot()
    assert snapshot["rejected"] == {"decode_failed": 1} and snapshot["labeled_images_acked"] == 1


def test_a_corrupt_png_is_refused_and_a_good_one_stored_byte_for_byte(tmp_path):
    intake, spool, _, _ = _intake(tmp_path)
    png = cv2.imencode(".png", images(1, 24, 3)[0])[1].tobytes()
    corrupt = bytearray(png)
    corrupt[60] ^= 0xFF  # inside the IDAT data: the header is intact, the CRC and zlib stream are not
    bodies = [
        pack_message("labeled", "cam", 1, [bytes(corrupt)], encoding="png", shapes=[[24, 24, 3]], labels=["a"]),
        pack_message("labeled", "cam", 2, [png], encoding="png", shapes=[[24, 24, 3]], labels=["a"]),
    ]
    refused, acked = _answers(intake.process(bodies))
    assert (refused["reason"], refused["image"]) == ("decode_failed", 0)
    assert acked["kind"] == "ack"
    [(_, record)] = list(read_records(spool.segment_path(0)))
    assert record.payloads == [png]  # kept as received, not re-encoded


def test_a_retry_of_a_stored_message_is_acked_without_decoding_again(tmp_path, monkeypatch):
    intake, _, _, _ = _intake(tmp_path)
    body = encode_message("labeled", "cam", 1, images(2), labels=["a", "b"])
    assert _answers(intake.process([body]))[0]["duplicate"] is False
    monkeypatch.setattr("cl_agent.intake.check_decodes", lambda *a: (_ for _ in ()).throw(AssertionError("decoded")))
    assert _answers(intake.process([body]))[0]["duplicate"] is True


def test_header_refusals_name_the_image_too(tmp_path):
    intake, _, _, _ = _intake(tmp_path)
    good = _jpeg()
    body = pack_message("labeled", "cam", 3, [good, good], shapes=[[32, 32, 3], [31, 32, 3]], labels=["a", "a"])
    [answer] = _answers(intake.process([body]))
    assert (answer["reason"], answer["image"]) == ("shape_mismatch", 1) and answer["detail"].startswith("image 1:")


def test_over_a_socket_the_client_sees_decode_failed_with_the_image_index(tmp_path):
    good, bad = _jpeg(1), _truncated(_jpeg(2))
    with make_service(tmp_path) as service, LabeledClient(service.endpoints["labeled"], "robot") as client:
        ack = client.send_encoded([good, bad, good], [[32, 32, 3]] * 3, ["a", "b", "c"], encoding="jpeg")
        assert not ack.ok and ack.reason == "decode_failed" and ack.header["image"] == 1
        assert client.send_encoded([good], [[32, 32, 3]], ["a"], encoding="jpeg").ok
        counters = service.counters()
    assert counters["labeled_images_acked"] == 1 and counters["rejected"] == {"decode_failed": 1}


def test_the_trainer_names_sender_seq_and_image_of_a_stored_image_it_cannot_decode(tmp_path, caplog):
    # A record stored before intake decoded images (or damaged on disk afterwards).
    spool = Spool(tmp_path / "spool", 0, 10**9)
    good, bad = _jpeg(1), _truncated(_jpeg(2))
    spool.append(Record("robot-3", 17, "jpeg", [(32, 32, 3)] * 2, [0, 1], [good, bad], "rgb", 0.0))
    spool.commit()
    store = ExperienceStore(tmp_path)
    store.write(0, labeled_segment=spool.segment_path(0).name, labeled_samples=2, keys=spool.segment_keys,
                unlabeled=[], reason="explicit", classes=spool.segment_classes)
    spool.close()
    with caplog.at_level(logging.WARNING, logger="cl_agent.experience"):
        labeled, labels, _ = store.load(0).decode(16)
    assert labeled.shape == (1, 16, 16, 3) and labels.tolist() == [0]
    assert "robot-3 seq 17 image 1 (decode_failed)" in caplog.text


def _damaged(data: bytes, how: str) -> bytes:
    data = bytearray(data)
    sos = data.find(b"\xff\xda")
    if how == "scan_header_only":
        return bytes(data[: sos + 2 + int.from_bytes(data[sos + 2 : sos + 4], "big")])
    if how == "unknown_component":
        data[sos + 5] = 0x77
        return bytes(data)
    if how == "bytes_removed":
        return bytes(data[: sos + 40] + data[sos + 90 :])
    return _truncated(bytes(data))


@pytest.mark.parametrize("how", ["scan_header_only", "unknown_component", "bytes_removed", "truncated"])
@pytest.mark.parametrize("progressive", [False, True])
def test_check_decodes_fails_exactly_where_the_trainers_full_colour_decode_fails(how, progressive):
    image = images(1, 64, 4)[0]
    data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])[1].tobytes()
    check_decodes(data, "jpeg")  # the whole image passes
    damaged = _damaged(data, how)
    trainer_fails = cv2.imdecode(np.frombuffer(damaged, np.uint8), cv2.IMREAD_COLOR) is None
    assert trainer_fails or how == "bytes_removed"  # libjpeg may decode around removed bytes, with a warning
    try:
        check_decodes(damaged, "jpeg")
        refused = None
    except WireError as e:
        refused = e.reason
    assert refused == ("decode_failed" if trainer_fails else None)


def test_a_large_message_is_checked_on_worker_threads_and_names_its_first_bad_image(tmp_path, monkeypatch):
    import threading

    from cl_agent import intake as intake_module

    intake, spool, _, _ = _intake(tmp_path)
    good = [_jpeg(seed, 192) for seed in range(8)]  # noise: about 60 KB each, past PARALLEL_CHECK_BYTES together
    assert sum(map(len, good)) >= intake_module.PARALLEL_CHECK_BYTES
    bad = list(good)
    bad[6], bad[3] = _truncated(good[6]), _truncated(good[3])
    threads = []

    def recording(payload, encoding):
        threads.append(threading.current_thread().name)
        return check_decodes(payload, encoding)

    monkeypatch.setattr(intake_module, "check_decodes", recording)
    shapes = [[192, 192, 3]] * 8
    try:
        refused, acked = _answers(intake.process([
            pack_message("labeled", "cam", 1, bad, shapes=shapes, labels=["a"] * 8),
            pack_message("labeled", "cam", 2, good, shapes=shapes, labels=["a"] * 8),
        ]))
        small = _answers(intake.process([pack_message("labeled", "cam", 3, [_jpeg()] * 2, shapes=[[32, 32, 3]] * 2, labels=["a"] * 2)]))
    finally:
        intake.close()
    assert (refused["reason"], refused["image"]) == ("decode_failed", 3)  # the lowest bad index, whatever finished first
    assert refused["detail"].startswith("image 3:")
    assert acked["kind"] == "ack" and acked["accepted"] == 8 and small[0]["kind"] == "ack"
    assert all(name.startswith("decode-check") for name in threads[:-2])  # the large messages, on the pool
    assert threads[-2:] == [threading.current_thread().name] * 2  # a small one stays on the calling thread
