"""Image payloads: sizes read from JPEG/PNG header bytes, and bomb-safe decoding to uint8 RGB.

The wire protocol (wire.py) uses these to check an image's real size before a
single pixel is decoded: a decompression bomb is refused by its header.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from cl_agent.config import WireSection

ENCODINGS = ("jpeg", "png", "raw")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, progressive, lossless...); C4, C8, CC are not frames.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_MARKER = struct.Struct(">BBH")  # 0xFF, marker, segment length
_SOF = struct.Struct(">BHHB")  # (after the length) precision, height, width, components


class WireError(ValueError):
    """A refused message. ``reason`` is a short snake_case code (counted per reason), ``detail`` is for humans,
    ``image`` the index of the payload refused when the refusal is about one image (None otherwise)."""

    def __init__(self, reason: str, detail: str = "", image: int | None = None):
        self.reason, self.detail, self.image = reason, detail, image
        super().__init__(f"{reason}: {detail}" if detail else reason)


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
    if len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
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


def check_size(height: int, width: int, limits: WireSection, what: str) -> None:
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
        check_size(height, width, limits, "raw image")
        if len(payload) != height * width * channels:
            raise WireError("raw_size_mismatch", f"{len(payload)} bytes for shape {tuple(shape)}")
        array = np.frombuffer(payload, dtype=np.uint8).reshape(height, width, channels)
        if channels == 1:
            return np.repeat(array, 3, axis=2)
        return np.ascontiguousarray(array[:, :, ::-1]) if color == "bgr" else array.copy()
    height, width, _ = image_dimensions(payload, encoding)
    check_size(height, width, limits, "encoded image")
    if shape is not None and (height, width) != tuple(shape[:2]):
        raise WireError("shape_mismatch", f"declared {tuple(shape[:2])}, image header says {(height, width)}")
    bgr = cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise WireError("decode_failed", f"{encoding} payload of {len(payload)} bytes could not be decoded")
    if bgr.shape[:2] != (height, width):
        raise WireError("shape_mismatch", f"decoded {bgr.shape[:2]}, image header said {(height, width)}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def resize_to_input(image: np.ndarray, size: int) -> np.ndarray:
    """A uint8 (H, W, 3) image as the model's (size, size, 3) input: the server's resize, and the client's
    for an image larger than that (both must give the same pixels). Aspect ratio is not kept."""
    if image.shape[:2] == (size, size):
        return image
    import cv2

    return cv2.resize(np.ascontiguousarray(image), (size, size), interpolation=cv2.INTER_AREA)


def check_decodes(payload: bytes | memoryview, encoding: str) -> None:
    """Decode a jpeg/png payload to its end, as the trainer will, and discard the pixels.

    ``decode_failed`` if the codec cannot (a truncated or corrupt body passes every header check).
    A JPEG is decoded at 1/8 scale in grey: libjpeg still reads every entropy-coded block, where
    every decoding error arises, and skips most of the inverse DCT and the colour conversion, which
    cannot fail (about 4x cheaper). In 5,500 corrupted JPEGs (truncated, bytes changed, removed or
    inserted; baseline, progressive, restart markers) it failed exactly when the trainer's full-size
    colour decode failed. Sizes are not checked here: call ``check_size`` with the header's size first.
    Raw payloads have nothing to decode (their length is checked against the declared shape).
    """
    import cv2

    if encoding == "raw":
        return
    flag = cv2.IMREAD_REDUCED_GRAYSCALE_8 if encoding == "jpeg" else cv2.IMREAD_GRAYSCALE
    if cv2.imdecode(np.frombuffer(payload, dtype=np.uint8), flag) is None:
        raise WireError("decode_failed", f"{encoding} payload of {len(payload)} bytes could not be decoded")


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
