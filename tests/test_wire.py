"""The wire protocol: round trips, and every validation limit refused with its reason before decoding."""

import json
import struct
import zlib

import cv2
import numpy as np
import pytest

from cl_agent.config import WireSection
from cl_agent.wire import (
    PROTOCOL_VERSION,
    WireError,
    decode_image,
    decode_message,
    decode_reply,
    encode_message,
    json_number,
    prediction_reply,
    reply,
    image_dimensions,
    jpeg_dimensions,
    pack_message,
    peek_seq,
    png_dimensions,
)

LIMITS = WireSection()


def rgb(h=24, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def jpeg(h=24, w=32) -> bytes:
    return cv2.imencode(".jpg", rgb(h, w))[1].tobytes()


def header_of(parts):
    return json.loads(parts[0])


def with_header(parts, **changes):
    header = header_of(parts)
    header.update(changes)
    return [json.dumps(header).encode(), *parts[1:]]


def reason(parts, limits=LIMITS):
    with pytest.raises(WireError) as info:
        decode_message(parts, limits)
    return info.value.reason


@pytest.mark.parametrize("encoding", ["jpeg", "png", "raw"])
def test_round_trip(encoding):
    images = [rgb(seed=1), rgb(10, 12, seed=2)]
    parts = encode_message("labeled", "cam-1", 7, images, encoding=encoding, labels=["cat", 3], top_k=5)
    assert len(parts) == 3
    message = decode_message(parts, LIMITS)
    assert (message.kind, message.sender, message.seq, message.labels) == ("labeled", "cam-1", 7, ["cat", 3])
    assert message.header["v"] == PROTOCOL_VERSION and message.header["top_k"] == 5
    assert message.shapes == [(24, 32, 3), (10, 12, 3)]
    for i, original in enumerate(images):
        decoded = message.image(i, LIMITS)
        assert decoded.dtype == np.uint8 and decoded.shape == original.shape
        if encoding == "jpeg":
            assert np.abs(decoded.astype(int) - original).mean() < 60  # lossy, but the same picture
        else:
            assert np.array_equal(decoded, original)


def test_colour_order_is_rgb():
    red = np.zeros((16, 16, 3), np.uint8)
    red[..., 0] = 255
    for encoding in ("jpeg", "png", "raw"):
        decoded = decode_message(encode_message("frame", "c", 0, [red], encoding=encoding), LIMITS).image(0, LIMITS)
        assert decoded[..., 0].mean() > 240 and decoded[..., 2].mean() < 15, encoding


def test_reply_without_images_is_one_part():
    parts = encode_message("ack", "agent", 3, [], accepted=2)
    assert len(parts) == 1
    message = decode_message(parts, LIMITS)
    assert message.kind == "ack" and message.payloads == [] and message.header["accepted"] == 2


def test_reserved_fields_cannot_be_overridden():
    with pytest.raises(ValueError):
        encode_message("frame", "c", 0, [], seq_override=1, kind2=2, labels2=3, v=2)


def test_image_dimensions_from_header_bytes():
    assert jpeg_dimensions(jpeg(37, 53)) == (37, 53, 3)
    png = cv2.imencode(".png", rgb(19, 21))[1].tobytes()
    assert png_dimensions(png) == (19, 21, 3)
    assert image_dimensions(png, "png")[:2] == (19, 21)
    for bad in (b"", b"\xff\xd8", b"not an image at all", b"\xff\xd8\xff\xe0\x00\x10JFIF"):
        with pytest.raises(WireError):
            jpeg_dimensions(bad)


def _patch_jpeg_size(data: bytes, height: int, width: int) -> bytes:
    """Rewrite the SOF0 dimensions of a baseline JPEG (what a decompression bomb declares)."""
    i = data.index(b"\xff\xc0")
    return data[: i + 5] + struct.pack(">HH", height, width) + data[i + 9 :]


def _png_bomb(side: int) -> bytes:
    """A real grey PNG of side x side zero pixels: a few KB that would decode to side**2 bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (side + 1)
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def test_decompression_bombs_refused_before_decoding():
    bomb = _png_bomb(5000)  # 25 Mpixel, ~25 KB on the wire
    assert len(bomb) < 100_000
    parts = pack_message("frame", "c", 0, [bomb], encoding="png", shapes=[[5000, 5000, 1]])
    assert reason(parts) == "image_too_large"
    # Declaring a small size does not help: the PNG header is read and compared.
    parts = pack_message("frame", "c", 0, [bomb], encoding="png", shapes=[[10, 10, 1]])
    assert reason(parts) == "shape_mismatch"
    with pytest.raises(WireError, match="image_too_large"):
        decode_image(bomb, "png", LIMITS)
    big = _patch_jpeg_size(jpeg(), 60000, 60000)
    with pytest.raises(WireError) as info:
        decode_image(big, "jpeg", LIMITS)
    assert info.value.reason == "image_too_large"


def _valid(n=2, encoding="jpeg"):
    return encode_message("labeled", "s", 1, [rgb(seed=i) for i in range(n)], encoding=encoding, labels=["a"] * n)


@pytest.mark.parametrize(
    "make_parts, limits, expected",
    [
        (lambda: [], LIMITS, "empty_message"),
        (lambda: _valid(5), WireSection(max_parts=4), "too_many_parts"),
        (lambda: _valid(2), WireSection(max_part_bytes=100), "part_too_large"),
        (lambda: _valid(1), WireSection(max_part_bytes=100), "part_too_large"),  # the one image, part 1
        (lambda: [_valid(1)[0], b"x" * 101, b"y"], WireSection(max_part_bytes=100), "part_too_large"),
        (lambda: _valid(3), WireSection(max_message_bytes=1000), "message_too_large"),
        (lambda: with_header(_valid(1), pad="x" * 400), WireSection(max_header_bytes=256), "header_too_large"),
        (lambda: [b"{not json", b"x"], LIMITS, "bad_json"),
        (lambda: [b"\xff\xfe", b"x"], LIMITS, "bad_json"),
        (lambda: [b"[1, 2]"], LIMITS, "bad_header"),
        (lambda: with_header(_valid(1), v=99), LIMITS, "bad_version"),
        (lambda: with_header(_valid(1), kind="Drop Tables"), LIMITS, "bad_kind"),
        (lambda: with_header(_valid(1), sender=""), LIMITS, "bad_sender"),
        (lambda: with_header(_valid(1), seq=-1), LIMITS, "bad_seq"),
        (lambda: with_header(_valid(1), seq="7"), LIMITS, "bad_seq"),
        (lambda: with_header(_valid(1), encoding="pickle"), LIMITS, "bad_encoding"),
        (lambda: _valid(1, "png"), WireSection(encodings=["jpeg"]), "bad_encoding"),
        (lambda: with_header(_valid(2), shapes=[[24, 32, 3]]), LIMITS, "bad_shape"),
        (lambda: with_header(_valid(1), shapes=[[24, -32, 3]]), LIMITS, "bad_shape"),
        (lambda: _valid(1), WireSection(max_image_side=16), "image_too_large"),
        (lambda: _valid(1), WireSection(max_image_pixels=100), "image_too_large"),
        (lambda: with_header(_valid(1), shapes=[[20, 20, 3]]), LIMITS, "shape_mismatch"),
        (lambda: [_valid(1)[0], b"\xff\xd8garbage"], LIMITS, "bad_image_header"),
        (lambda: [_valid(1, "raw")[0], b"\x00" * 10], LIMITS, "raw_size_mismatch"),
        (lambda: with_header(_valid(2), labels=["a"]), LIMITS, "label_count_mismatch"),
        (lambda: with_header(_valid(2), labels=None), LIMITS, "bad_label"),
        (lambda: with_header(_valid(1), labels=[-3]), LIMITS, "bad_label"),
        (lambda: with_header(_valid(1), labels=[True]), LIMITS, "bad_label"),
        (lambda: with_header(_valid(1), labels=[1.5]), LIMITS, "bad_label"),
        (lambda: with_header(_valid(1), labels=[" circle"]), LIMITS, "bad_label"),
        (lambda: with_header(_valid(1), labels=["cir\ncle"]), LIMITS, "bad_label"),
        (lambda: pack_message("labeled", "s", 1, labels=[]), LIMITS, "no_images"),
    ],
)
def test_every_limit_has_a_reason(make_parts, limits, expected):
    assert reason(make_parts(), limits) == expected


def _damaged_after_sos(how: str) -> bytes:
    data = bytearray(jpeg(32, 32))
    sos = data.find(b"\xff\xda")
    length = int.from_bytes(data[sos + 2 : sos + 4], "big")
    if how == "truncated":
        return bytes(data[: sos + 2 + length])  # the scan header, then nothing: no entropy-coded data, no EOI
    data[sos + 5] = 0x77  # the scan names a component the frame does not have: a fatal libjpeg error
    return bytes(data)


@pytest.mark.parametrize("how", ["truncated", "unknown_component"])
def test_corrupt_jpeg_body_fails_only_at_decode(how):
    data = _damaged_after_sos(how)
    message = decode_message(pack_message("frame", "c", 0, [data], shapes=[[32, 32, 3]]), LIMITS)  # the header is fine
    with pytest.raises(WireError) as info:
        message.image(0, LIMITS)
    assert info.value.reason == "decode_failed"


def test_peek_seq_names_refused_messages():
    assert peek_seq(with_header(_valid(1), seq=42), LIMITS) == 42
    assert peek_seq([b"garbage"], LIMITS) == 0


def test_peek_seq_finds_the_seq_of_an_oversized_header():
    parts = with_header(_valid(1), seq=77, pad="x" * 10_000)
    assert reason(parts, WireSection(max_header_bytes=1024)) == "header_too_large"
    assert peek_seq(parts, WireSection(max_header_bytes=1024)) == 77


def test_prediction_reply_parses_to_what_the_generic_reply_holds():
    predictions = [[["cat \"tabby\"", 0.75], ["d\u00f6g", 1e-05]], [["x", 0.5]]]
    generic = header_of(reply("prediction", "server", 7, model="m\u00fc", model_version=3, predictions=predictions))
    fast = prediction_reply("server", 7, "m\u00fc", 3, json.dumps(predictions))
    assert len(fast) == 1
    parsed = header_of(fast)
    assert abs(parsed.pop("ts") - generic.pop("ts")) < 5
    assert parsed == generic
    assert decode_reply(fast, LIMITS) == {**parsed, "ts": header_of(fast)["ts"]}


@pytest.mark.parametrize("value", [0.0, 0.1, 1e-05, 0.30000001192092896, 1.0, float("nan"), float("inf"), -float("inf")])
def test_json_number_writes_what_json_dumps_writes(value):
    assert json_number(value) == json.dumps(value)


def test_decode_reply_refuses_what_is_not_a_reply():
    good = reply("prediction", "server", 3, predictions=[])
    assert decode_reply(good, LIMITS)["seq"] == 3
    cases = {
        "bad_reply": [good[0], b"extra"],
        "bad_json": [b"{not json"],
        "bad_header": [b"[1, 2]"],
        "bad_version": with_header(good, v=99),
        "bad_kind": with_header(good, kind=5),
        "bad_seq": with_header(good, seq="3"),
        "message_too_large": [b" " * (LIMITS.max_message_bytes + 1)],
    }
    for expected, parts in cases.items():
        with pytest.raises(WireError) as info:
            decode_reply(parts, LIMITS)
        assert info.value.reason == expected, (expected, info.value)


@pytest.mark.parametrize(
    "label, problem",
    [(1.5, "non-negative int"), (None, "non-negative int"), (-1, "non-negative int"), (True, "non-negative int"),
     (" circle", "leading or trailing whitespace"), ("circle\t", "leading or trailing whitespace"), ("a\x00b", "control characters"),
     ("", "1..256 characters")],
)
def test_pack_message_refuses_a_label_it_would_otherwise_change(label, problem):
    with pytest.raises(ValueError, match=f"label 1 .*{problem}"):
        pack_message("labeled", "s", 1, [b"x", b"y"], shapes=[[1, 1, 3]] * 2, labels=["ok", label])


def test_pack_message_sends_numpy_integer_labels_as_ints():
    header = json.loads(pack_message("labeled", "s", 1, [b"x"], shapes=[[1, 1, 3]], labels=[np.int64(3)])[0])
    assert header["labels"] == [3]
