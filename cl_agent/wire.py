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
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from cl_agent.codec import (  # noqa: F401  (re-exported: the wire API includes the image helpers)
    ENCODINGS,
    PNG_SIGNATURE,
    WireError,
    check_size,
    decode_image,
    encode_image,
    image_dimensions,
    jpeg_dimensions,
    png_dimensions,
)

if TYPE_CHECKING:
    from cl_agent.config import WireSection

PROTOCOL_VERSION = 1

# Message kinds this project uses; the wire layer accepts any snake_case kind and
# leaves refusing unexpected kinds to the receiving service.
KINDS = ("labeled", "frame", "end_experience", "ack", "nack", "infer", "prediction", "error", "status")
# Header keys set by encode_message; **fields may not override them.
RESERVED_KEYS = frozenset({"v", "kind", "sender", "seq", "ts", "encoding", "shapes", "labels", "color"})

MAX_SENDER_CHARS = 256
MAX_LABEL_CHARS = 256
_KIND_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_KNOWN_KINDS = frozenset(KINDS)  # checked before the pattern: a set lookup costs less on the serving path
# One compact encoder for every header (json.dumps with separators would build a new one per call).
_JSON = json.JSONEncoder(separators=(",", ":"))


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
        # numpy integers become ints; anything else that is not a label is refused here, never truncated (1.5 is not class 1)
        labels = [int(lab) if isinstance(lab, np.integer) else lab for lab in labels]
        for i, label in enumerate(labels):
            problem = label_problem(label)
            if problem:
                raise ValueError(f"label {i} {problem}")
        header["labels"] = labels
    header.update(fields)
    return [_JSON.encode(header).encode(), *payloads]


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


def check_outgoing_size(parts: Sequence[bytes], limit: int, what: str) -> None:
    """Refuse before sending a message that a receiver with this ``wire.max_message_bytes`` drops unread.

    Its socket's ``maxmsgsize`` disconnects a peer that sends a frame above the limit, so the
    sender would see only timeouts, and a retrying client would lose its connection on every resend.
    """
    size = sum(len(part) for part in parts)
    if size > limit:
        raise WireError("message_too_large", f"{what} is {size} bytes, above the receiver's wire limit of {limit} bytes (wire.max_message_bytes)")


def _parse_json(part: bytes) -> dict:
    try:
        header = json.loads(bytes(part))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireError("bad_json", f"header is not JSON: {e}") from None
    except RecursionError:  # e.g. "[[[[..." thousands deep: refuse it, never let it end the receiving loop
        raise WireError("bad_json", "header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise WireError("bad_header", f"header must be a JSON object, got {type(header).__name__}")
    return header


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_payloads(
    payloads: Sequence[bytes], encoding: str, declared: list[tuple[int, int, int]], limits: WireSection
) -> None:
    """Declared sizes within limits; actual sizes (from image header bytes / raw length) equal to the declared ones.

    A refusal names the image: ``WireError.image`` is its index, and the detail starts with ``image i:``.
    """
    for i, (payload, (height, width, channels)) in enumerate(zip(payloads, declared)):
        try:
            check_size(height, width, limits, "declared")
            if encoding == "raw":
                if len(payload) != height * width * channels:
                    raise WireError("raw_size_mismatch", f"{len(payload)} bytes for shape {(height, width, channels)}")
            else:
                actual_h, actual_w, _ = image_dimensions(payload, encoding)
                if (actual_h, actual_w) != (height, width):
                    raise WireError("shape_mismatch", f"declared {(height, width)}, {encoding} header says {(actual_h, actual_w)}")
        except WireError as e:
            raise WireError(e.reason, f"image {i}: {e.detail}", image=i) from None


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


def label_problem(label: Any) -> str | None:
    """Why ``label`` is not a class name (1..MAX_LABEL_CHARS characters, no surrounding whitespace, no
    control characters) or a non-negative integer class id; None if it is one."""
    if isinstance(label, str):
        if not label or len(label) > MAX_LABEL_CHARS:
            return f"must be 1..{MAX_LABEL_CHARS} characters"
        if label != label.strip():  # " circle" would silently become a class of its own
            return f"has leading or trailing whitespace: {label!r:.100}"
        if not label.isprintable():
            return f"has control characters: {label!r:.100}"
        return None
    if not (_is_int(label) and label >= 0):
        return f"must be a class name or a non-negative int, got {label!r:.100}"
    return None


def _parse_labels(raw: Any, count: int) -> list:
    if not isinstance(raw, list):
        raise WireError("bad_label", f"'labels' must be a list, got {type(raw).__name__}")
    if len(raw) != count:
        raise WireError("label_count_mismatch", f"{len(raw)} labels for {count} images")
    for i, label in enumerate(raw):
        problem = label_problem(label)
        if problem:
            raise WireError("bad_label", f"label {i} {problem}")
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
    if not isinstance(kind, str) or not (kind in _KNOWN_KINDS or _KIND_RE.match(kind)):
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
    elif payload[:8] == PNG_SIGNATURE:
        encoding = "png"
    else:
        raise WireError("bad_image_header", "imagezmq payload is neither a JPEG nor a PNG")
    if encoding not in limits.encodings:
        raise WireError("bad_encoding", f"encoding {encoding!r} not accepted (allowed: {', '.join(limits.encodings)})")
    height, width, _ = image_dimensions(payload, encoding)
    check_size(height, width, limits, "imagezmq image")
    return Message(header, "frame", sender, 0, [payload], None, encoding, [(height, width, 3)], "rgb")


def reply(kind: str, sender: str, seq: int, **fields: Any) -> list[bytes]:
    """A single-part reply (ack, nack, error, prediction)."""
    return pack_message(kind, sender, seq, **fields)


def json_number(value: float) -> str:
    """``value`` as JSON text, as ``json.dumps`` writes it (NaN and infinities included)."""
    if value - value == 0.0:  # finite
        return repr(value)
    return _JSON.encode(value)


def prediction_reply(sender: str, seq: int, model: str, model_version: int, predictions_json: str) -> list[bytes]:
    """The ``prediction`` reply, with ``predictions`` already JSON text.

    Equal, once parsed, to ``reply("prediction", sender, seq, model=..., model_version=..., predictions=...)``;
    written with one format string because it is built on the serving path for every request, where a
    generic encoder costs several times more (its code and data are cold after each ``session.run``).
    """
    header = '{"v":%d,"kind":"prediction","sender":%s,"seq":%d,"ts":%s,"model":%s,"model_version":%d,"predictions":%s}' % (
        PROTOCOL_VERSION, _JSON.encode(sender), seq, repr(time.time()), _JSON.encode(model), model_version, predictions_json
    )
    return [header.encode()]


def decode_reply(parts: Sequence[bytes], limits: WireSection) -> dict:
    """The header of a single-part reply from a server (sizes, JSON object, version, kind and seq checked).

    Lighter than ``decode_message`` (no payloads to check): a client parses one per request.
    """
    if len(parts) != 1:
        raise WireError("bad_reply", f"a reply has one part, got {len(parts)}")
    if len(parts[0]) > limits.max_message_bytes:
        raise WireError("message_too_large", f"{len(parts[0])} bytes, limit {limits.max_message_bytes}")
    header = _parse_json(parts[0])
    if header.get("v") != PROTOCOL_VERSION:
        raise WireError("bad_version", f"protocol version {header.get('v')!r:.50}, this client speaks {PROTOCOL_VERSION}")
    if not isinstance(header.get("kind"), str):
        raise WireError("bad_kind", f"kind must be a string, got {header.get('kind')!r:.100}")
    if not _is_int(header.get("seq")):
        raise WireError("bad_seq", f"seq must be an integer, got {header.get('seq')!r:.100}")
    return header


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
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            pass
    match = _SEQ_RE.search(head)  # an oversized or broken header: look for the field without parsing it all
    return int(match.group(1)) if match else 0
