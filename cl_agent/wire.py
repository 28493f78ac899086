"""The wire protocol: a versioned JSON header followed by one payload part per image.

Everything that arrives over a socket goes through ``decode_message`` before it
is stored or decoded: part count, bytes per part and per message, header size
and fields, allowed encodings, declared image sizes, actual image sizes read from
the JPEG/PNG header bytes (so a decompression bomb is refused before any pixel is
decoded), and label count. A refusal raises ``WireError`` with a short reason code;
callers count it and carry on. Nothing is ever unpickled. See docs/protocol.md.

Frames from an unmodified imagezmq ImageSender (a JSON part with ``msg`` and,
for arrays, ``dtype``/``shape``, then the payload) are accepted by
``decode_imagezmq``, which maps them onto the same ``Message``.
"""

from __future__ import annotations

import json
import re
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from cl_agent.config import WireSection

PROTOCOL_VERSION = 1

# Message kinds this project uses; the wire layer accepts any snake_case kind and
# leaves refusing unexpected kinds to the receiving service.
KINDS = ("labeled", "frame", "end_experience", "ack", "nack", "infer", "prediction", "error", "status")
ENCODINGS = ("jpeg", "png", "raw")
# Header keys set by encode_message; **fields may not override them.
RESERVED_KEYS = frozenset({"v", "kind", "sender", "seq", "ts", "encoding", "shapes", "labels", "color"})

MAX_SENDER_CHARS = 256
MAX_LABEL_CHARS = 256
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless...); C4, C8, CC are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_MARKER = struct.Struct(">BBH")  # 0xFF, marker, segment length
_SOF = struct.Struct(">BHHB")  # (after the length) precision, height, width, components


class WireError(ValueError):
    """A refused message. ``reason`` is a short snake_case code (counted per reason), ``detail`` is for humans."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}" if detail else reason)


@dataclass
class Message:
    """A validated message. Payloads are still encoded; ``image(i)`` decodes one."""

    header: dict
    kind: str
    sender: str
    seq: int
    payloads: list[bytes]
    labels: list | None = None
    encoding: str = "jpeg"
    shapes: list[tuple[int, int, int]] = field(default_factory=list)  # (H, W, C) per payload, checked
    color: str = "rgb"  # channel order of raw payloads ("bgr" for OpenCV/imagezmq arrays)

    @property
    def nbytes(self) -> int:
        return sum(len(p) for p in self.payloads)

    def image(self, i: int, limits: WireSection) -> np.ndarray:
        """Decode payload ``i`` to uint8 (H, W, 3) RGB; the size is checked against ``limits`` before decoding."""
        payload = self.payloads[i]
        return decode_image(payload, self.encoding, limits, shape=self.shapes[i] if self.shapes else None, color=self.color)


# --------------------------------------------------------------------------- image headers


def jpeg_dimensions(data: bytes | memoryview) -> tuple[int, int, int]:
    """(height, width, components) from a JPEG's start-of-frame segment, without decoding pixels."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise WireError("bad_image_header", "payload does not start with a JPEG SOI marker")
    i = 2
    unpack = _MARKER.unpack_from
    while i + 4 <= n:
        prefix, marker, length = unpack(data, i)
        if prefix != 0xFF:
            raise WireError("bad_image_header", f"expected a JPEG marker at byte {i}")
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker == 0xD9 or marker == 0xDA:
            break
        if length < 2:
            raise WireError("bad_image_header", f"JPEG segment length {length} at byte {i}")
        if marker in _JPEG_SOF:
            if i + 10 > n:
                break
            _, height, width, components = _SOF.unpack_from(data, i + 4)
            if height == 0 or width == 0 or components not in (1, 3, 4):
                raise WireError("bad_image_header", f"JPEG frame {height}x{width} with {components} components")
            return height, width, components
        i += 2 + length
    raise WireError("bad_image_header", "no JPEG start-of-frame segment before the image data")


def png_dimensions(data: bytes | memoryview) -> tuple[int, int, int]:
    """(height, width, channels) from a PNG's IHDR chunk, without decoding pixels."""
    data = bytes(data[:33])
    if len(data) < 33 or data[:8] != _PNG_SIGNATURE or data[12:16] != b"IHDR":
        raise WireError("bad_image_header", "payload is not a PNG with an IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    color_type = data[25]
    channels = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(color_type)
    if height == 0 or width == 0 or channels is None:
        raise WireError("bad_image_header", f"PNG {height}x{width} with colour type {color_type}")
    return height, width, channels


def image_dimensions(payload: bytes | memoryview, encoding: str) -> tuple[int, int, int]:
    """(height, width, channels) of an encoded jpeg/png payload from its header bytes."""
    if encoding == "jpeg":
        return jpeg_dimensions(payload)
    if encoding == "png":
        return png_dimensions(payload)
    raise WireError("bad_encoding", f"no header to read for encoding {encoding!r}")


def _check_size(height: int, width: int, limits: WireSection, what: str) -> None:
    if height > limits.max_image_side or width > limits.max_image_side:
        raise WireError("image_too_large", f"{what} {height}x{width} exceeds max_image_side {limits.max_image_side}")
    if height * width > limits.max_image_pixels:
        raise WireError(
            "image_too_large", f"{what} {height}x{width} exceeds max_image_pixels {limits.max_image_pixels}"
        )


def decode_image(
    payload: bytes | memoryview,
    encoding: str,
    limits: WireSection,
    *,
    shape: tuple[int, ...] | None = None,
    color: str = "rgb",
) -> np.ndarray:
    """Decode one payload to uint8 (H, W, 3) RGB. Sizes are checked from header bytes before decoding."""
    import cv2

    if encoding == "raw":
        if shape is None:
            raise WireError("bad_shape", "a raw payload needs a declared shape")
        height, width, channels = shape
        _check_size(height, width, limits, "raw image")
        if len(payload) != height * width * channels:
            raise WireError("raw_size_mismatch", f"{len(payload)} bytes for shape {tuple(shape)}")
        array = np.frombuffer(payload, dtype=np.uint8).reshape(height, width, channels)
        if channels == 1:
            return np.repeat(array, 3, axis=2)
        return np.ascontiguousarray(array[:, :, ::-1]) if color == "bgr" else array.copy()
    height, width, _ = image_dimensions(payload, encoding)
    _check_size(height, width, limits, "encoded image")
    if shape is not None and (height, width) != tuple(shape[:2]):
        raise WireError("shape_mismatch", f"declared {tuple(shape[:2])}, image header says {(height, width)}")
    bgr = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise WireError("decode_failed", f"{encoding} payload of {len(payload)} bytes could not be decoded")
    if bgr.shape[:2] != (height, width):
        raise WireError("shape_mismatch", f"decoded {bgr.shape[:2]}, image header said {(height, width)}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def encode_image(image: np.ndarray, encoding: str = "jpeg", quality: int = 90) -> tuple[bytes, tuple[int, int, int]]:
    """Encode a uint8 (H, W, 3) RGB array; returns (payload, (H, W, 3))."""
    import cv2

    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}")
    shape = (int(image.shape[0]), int(image.shape[1]), 3)
    if encoding == "raw":
        return np.ascontiguousarray(image).tobytes(), shape
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    elif encoding == "png":
        ok, buf = cv2.imencode(".png", bgr)
    else:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}")
    if not ok:
        raise ValueError(f"cv2 could not encode a {shape} image as {encoding}")
    return buf.tobytes(), shape


# --------------------------------------------------------------------------- messages


def pack_message(
    kind: str,
    sender: str,
    seq: int,
    payloads: Sequence[bytes] = (),
    *,
    encoding: str = "jpeg",
    shapes: Sequence[Sequence[int]] = (),
    labels: Sequence[str | int] | None = None,
    color: str = "rgb",
    **fields: Any,
) -> list[bytes]:
    """Build a multipart message from payloads that are already encoded (e.g. JPEG files read from disk)."""
    clash = RESERVED_KEYS.intersection(fields)
    if clash:
        raise ValueError(f"header fields {sorted(clash)} are reserved")
    if len(shapes) != len(payloads):
        raise ValueError(f"{len(payloads)} payloads but {len(shapes)} shapes")
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "kind": kind, "sender": sender, "seq": int(seq), "ts": time.time()}
    if payloads:
        header["encoding"] = encoding
        header["shapes"] = [[int(s) for s in shape] for shape in shapes]
        if encoding == "raw" and color != "rgb":
            header["color"] = color
    if labels is not None:
        header["labels"] = [lab if isinstance(lab, str) else int(lab) for lab in labels]
    header.update(fields)
    return [json.dumps(header, separators=(",", ":")).encode(), *payloads]


def encode_message(
    kind: str,
    sender: str,
    seq: int,
    images: Sequence[np.ndarray] = (),
    *,
    encoding: str = "jpeg",
    labels: Sequence[str | int] | None = None,
    quality: int = 90,
    **fields: Any,
) -> list[bytes]:
    """Multipart [JSON header, one payload per image]; images are uint8 (H, W, 3) RGB arrays."""
    encoded = [encode_image(image, encoding, quality) for image in images]
    return pack_message(
        kind,
        sender,
        seq,
        [payload for payload, _ in encoded],
        encoding=encoding,
        shapes=[shape for _, shape in encoded],
        labels=labels,
        **fields,
    )


def _check_parts(parts: Sequence[bytes], limits: WireSection) -> None:
    if not parts:
        raise WireError("empty_message", "no parts")
    if len(parts) > limits.max_parts:
        raise WireError("too_many_parts", f"{len(parts)} parts, limit {limits.max_parts}")
    total = 0
    for i, part in enumerate(parts):
        size = len(part)
        total += size
        if i > 0 and size > limits.max_part_bytes:
            raise WireError("part_too_large", f"part {i} has {size} bytes, limit {limits.max_part_bytes}")
    if total > limits.max_message_bytes:
        raise WireError("message_too_large", f"{total} bytes, limit {limits.max_message_bytes}")
    if len(parts[0]) > limits.max_header_bytes:
        raise WireError("header_too_large", f"{len(parts[0])} header bytes, limit {limits.max_header_bytes}")


def _parse_json(part: bytes) -> dict:
    try:
        header = json.loads(bytes(part))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError("bad_json", f"header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise WireError("bad_header", f"header must be a JSON object, got {type(header).__name__}")
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_payloads(
    payloads: Sequence[bytes], encoding: str, declared: list[tuple[int, int, int]], limits: WireSection
) -> None:
    """Declared sizes within limits; actual sizes (from image header bytes / raw length) equal to the declared ones."""
    for i, (payload, (height, width, channels)) in enumerate(zip(payloads, declared)):
        _check_size(height, width, limits, f"declared image {i}")
        if encoding == "raw":
            if len(payload) != height * width * channels:
                raise WireError("raw_size_mismatch", f"image {i}: {len(payload)} bytes for shape {(height, width, channels)}")
        else:
            actual_h, actual_w, _ = image_dimensions(payload, encoding)
            if (actual_h, actual_w) != (height, width):
                raise WireError(
                    "shape_mismatch", f"image {i}: declared {(height, width)}, {encoding} header says {(actual_h, actual_w)}"
                )


def _parse_shapes(raw: Any, count: int, encoding: str) -> list[tuple[int, int, int]]:
    if not isinstance(raw, list) or len(raw) != count:
        raise WireError("bad_shape", f"'shapes' must list one [H, W, C] per image ({count}), got {raw!r:.200}")
    shapes = []
    default_channels = 1 if encoding == "raw" else 3
    for i, shape in enumerate(raw):
        if type(shape) is not list or not 2 <= len(shape) <= 3:
            raise WireError("bad_shape", f"shape {i} must be [H, W] or [H, W, C] of positive ints, got {shape!r:.100}")
        for s in shape:
            if type(s) is not int or s <= 0:  # type() also excludes bools
                raise WireError("bad_shape", f"shape {i} must be [H, W] or [H, W, C] of positive ints, got {shape!r:.100}")
        channels = shape[2] if len(shape) == 3 else default_channels
        if encoding == "raw" and channels not in (1, 3):
            raise WireError("bad_shape", f"shape {i}: raw images need 1 or 3 channels, got {channels}")
        shapes.append((shape[0], shape[1], channels))
    return shapes


def _parse_labels(raw: Any, count: int) -> list:
    if not isinstance(raw, list):
        raise WireError("bad_label", f"'labels' must be a list, got {type(raw).__name__}")
    if len(raw) != count:
        raise WireError("label_count_mismatch", f"{len(raw)} labels for {count} images")
    for i, label in enumerate(raw):
        if isinstance(label, str):
            if not label or len(label) > MAX_LABEL_CHARS:
                raise WireError("bad_label", f"label {i} must be 1..{MAX_LABEL_CHARS} characters")
        elif not (_is_int(label) and label >= 0):
            raise WireError("bad_label", f"label {i} must be a class name or a non-negative int, got {label!r:.100}")
    return raw


def decode_message(parts: Sequence[bytes], limits: WireSection) -> Message:
    """Validate a multipart message (sizes, header, declared and actual image sizes, labels) without decoding images."""
    _check_parts(parts, limits)
    header = _parse_json(parts[0])
    if "v" not in header and "msg" in header:
        return decode_imagezmq(parts, limits, header=header)
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise WireError("bad_version", f"protocol version {version!r:.50}, this agent speaks {PROTOCOL_VERSION}")
    kind, sender, seq = header.get("kind"), header.get("sender"), header.get("seq")
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise WireError("bad_kind", f"kind must be a snake_case string, got {kind!r:.100}")
    if not isinstance(sender, str) or not 0 < len(sender) <= MAX_SENDER_CHARS:
        raise WireError("bad_sender", f"sender must be a string of 1..{MAX_SENDER_CHARS} characters, got {sender!r:.100}")
    if not _is_int(seq) or seq < 0:
        raise WireError("bad_seq", f"seq must be a non-negative integer, got {seq!r:.100}")
    payloads = list(parts[1:])
    encoding = header.get("encoding", "jpeg")
    shapes: list[tuple[int, int, int]] = []
    color = header.get("color", "rgb")
    if payloads:
        if encoding not in ENCODINGS or encoding not in limits.encodings:
            raise WireError("bad_encoding", f"encoding {encoding!r:.50} not accepted (allowed: {', '.join(limits.encodings)})")
        if color not in ("rgb", "bgr"):
            raise WireError("bad_header", f"color must be rgb or bgr, got {color!r:.50}")
        shapes = _parse_shapes(header.get("shapes"), len(payloads), encoding)
    elif header.get("shapes"):
        raise WireError("bad_shape", f"{len(header['shapes'])} shapes declared but no image parts")
    labels = None
    if "labels" in header or kind == "labeled":
        if kind == "labeled" and not payloads:
            raise WireError("no_images", "a labeled message needs at least one image")
        labels = _parse_labels(header.get("labels"), len(payloads))
    if payloads:
        _check_payloads(payloads, encoding, shapes, limits)
    return Message(header, kind, sender, seq, payloads, labels, encoding, shapes, color)


def decode_imagezmq(parts: Sequence[bytes], limits: WireSection, *, header: dict | None = None) -> Message:
    """Map an imagezmq ImageSender message ([{"msg", "dtype", "shape"}, array] or [{"msg"}, jpeg]) onto a frame."""
    _check_parts(parts, limits)
    header = _parse_json(parts[0]) if header is None else header
    if len(parts) != 2:
        raise WireError("bad_header", f"an imagezmq message has 2 parts, got {len(parts)}")
    name = header.get("msg")
    sender = name if isinstance(name, str) and 0 < len(name) <= MAX_SENDER_CHARS else "imagezmq"
    payload = parts[1]
    if "shape" in header or "dtype" in header:
        dtype, shape = header.get("dtype"), header.get("shape")
        if dtype != "uint8":
            raise WireError("bad_encoding", f"imagezmq array dtype {dtype!r:.50}; only uint8 images are accepted")
        if "raw" not in limits.encodings:
            raise WireError("bad_encoding", "raw arrays are not accepted (wire.encodings)")
        if not isinstance(shape, list) or len(shape) not in (2, 3):
            raise WireError("bad_shape", f"imagezmq array shape must be [H, W] or [H, W, C], got {shape!r:.100}")
        shapes = _parse_shapes([shape], 1, "raw")
        _check_payloads([payload], "raw", shapes, limits)
        # OpenCV images are BGR; a single-channel array is grey.
        return Message(header, "frame", sender, 0, [payload], None, "raw", shapes, "bgr")
    if payload[:2] == b"\xff\xd8":
        encoding = "jpeg"
    elif payload[:8] == _PNG_SIGNATURE:
        encoding = "png"
    else:
        raise WireError("bad_image_header", "imagezmq payload is neither a JPEG nor a PNG")
    if encoding not in limits.encodings:
        raise WireError("bad_encoding", f"encoding {encoding!r} not accepted (allowed: {', '.join(limits.encodings)})")
    height, width, _ = image_dimensions(payload, encoding)
    _check_size(height, width, limits, "imagezmq image")
    return Message(header, "frame", sender, 0, [payload], None, encoding, [(height, width, 3)], "rgb")


def reply(kind: str, sender: str, seq: int, **fields: Any) -> list[bytes]:
    """A single-part reply (ack, nack, error, prediction)."""
    return pack_message(kind, sender, seq, **fields)


_SEQ_RE = re.compile(rb'"seq"\s*:\s*(\d{1,20})')


def peek_seq(parts: Sequence[bytes], limits: WireSection) -> int:
    """Best-effort seq of a refused message, so its nack can name it; 0 when the header is unreadable."""
    if not parts:
        return 0
    head = bytes(parts[0][:4096])
    if len(parts[0]) <= min(limits.max_header_bytes, 4096):
        try:
            header = json.loads(head)
            seq = header.get("seq") if isinstance(header, dict) else None
            return seq if _is_int(seq) and seq >= 0 else 0
        except (UnicodeDecodeError, json.JSONDecodeError):
            pass
    match = _SEQ_RE.search(head)  # an oversized or broken header: look for the field without parsing it all
    return int(match.group(1)) if match else 0
