"""A client for the inference server, with a timeout and retries ("Lazy Pirate").

A REQ socket sends one ``infer`` request and waits up to ``timeout_s`` for the
reply. On a timeout the socket is closed and reopened (a REQ socket that lost
its reply cannot be reused) and the request is sent again, up to ``retries``
times; then ``InferenceError`` with reason ``timeout``. An ``error`` reply from
the server is raised at once (resending the same request would fail again); so is a
reply from another of the project's endpoints (reason ``wrong_endpoint``, naming it and
``serve.endpoint``, see ``cl_agent/peer.py``).
One client per thread: ZeroMQ sockets are not thread-safe.

``spin_us``: wait for the reply spinning (zero-timeout polls) for a window of this
many microseconds around the time it is due, and sleep in poll before and after.
A sleeping thread pays a wake-up when the reply lands (tens of microseconds, more on
a virtual machine, whose idle core the host may hand to other work in the
meantime); a latency-critical caller can trade up to ``spin_us`` of one core per
request for it. When the reply is due comes from the recent round trips of requests
with the same number of images (a moving average); until there is one, and
whenever it is due sooner than half the window, the spin starts right after the
send. A reply that arrives before the window wakes the sleeping poll as usual, so a
wrong guess costs a wake-up, never a late answer. 0 (the default) always sleeps.

``max_message_bytes``: the server's ``wire.max_message_bytes`` (default: the default
limit). A request above it is refused here with reason ``message_too_large``: the
server's socket drops a frame that large unread, so sending it would only time out.

Large images (a camera's full frame): a request the server's wire limits would refuse as it
is (a raw 1080p frame is above the default ``wire.max_part_bytes``) makes the client ask the
server for its model's input size (a ``status`` request; again only after the served version
changed). While that size is known for the version answering, every image with more pixels
than the input is resized to it here, with the server's own resize (``codec.resize_to_input``):
the same pixels reach the model, and kilobytes travel instead of megabytes. Images at the
input size or smaller go as they are, with no extra request, and are resized by the server.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import zmq

from cl_agent.client import connect, message_limit
from cl_agent.codec import resize_to_input
from cl_agent.config import WireSection
from cl_agent.errors import CLAgentError
from cl_agent.peer import INFERENCE, wrong_endpoint
from cl_agent.wire import WireError, check_outgoing_size, decode_reply, encode_message, pack_message


class InferenceError(CLAgentError):
    """The server refused a request or did not answer; ``reason`` is a short code."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"inference failed ({reason}): {detail}")


@dataclass
class InferenceResult:
    """Per image, the top-k (class name, probability) pairs, best first; and the version that answered."""

    predictions: list[list[tuple[str, float]]]
    model_version: int
    model: str

    @property
    def labels(self) -> list[str]:
        """The top-1 class name of each image."""
        return [p[0][0] for p in self.predictions]


def _check_top_k(top_k) -> int | None:
    """None (the server's default) or an int >= 1; a float, a bool or anything else is refused, never truncated."""
    if top_k is None:
        return None
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise CLAgentError(f"top_k must be an integer >= 1, got {top_k!r:.50}")
    return int(top_k)


def _as_rgb(image):
    """Grey (H, W) or (H, W, 1) uint8 -> (H, W, 3) with the value in every channel (as the server reads 1-channel raw images)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1)):
        return np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2)
    return image


def _is_rgb_batch(images) -> bool:
    """A (N, H, W, 3) uint8 array."""
    return isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[3] == 3


def _pixels(image) -> int:
    """H * W of a uint8 (H, W, 3) image; 0 for anything else (the encoder refuses it, naming its shape)."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return image.shape[0] * image.shape[1]
    return 0


def _sizes(images) -> list[tuple[int, int]]:
    """(H, W) of each uint8 RGB image of a batch or list, one entry for a whole (N, H, W, 3) batch."""
    if isinstance(images, np.ndarray):
        return [images.shape[1:3]] if _is_rgb_batch(images) else []
    return [image.shape[:2] for image in images if _pixels(image)]


def _too_large_to_send(images, limits: WireSection) -> bool:
    """Whether a server with these wire limits would refuse ``images`` sent raw: an image above
    ``max_part_bytes``, ``max_image_side`` or ``max_image_pixels``, or all of them above ``max_message_bytes``."""
    total = 0
    for height, width in _sizes(images):
        pixels = height * width
        if 3 * pixels > limits.max_part_bytes or max(height, width) > limits.max_image_side or pixels > limits.max_image_pixels:
            return True
        total += 3 * pixels
    if isinstance(images, np.ndarray):
        total *= len(images)
    return total > limits.max_message_bytes


def _fit_to_input(images, size: int):
    """``images`` with each one of more than size * size pixels resized to (size, size, 3); the others as they are.

    An (N, H, W, 3) array of such images comes back as an (N, size, size, 3) array.
    """
    if isinstance(images, np.ndarray):
        return np.stack([resize_to_input(image, size) for image in images])
    return [resize_to_input(image, size) if _pixels(image) > size * size else image for image in images]


class InferenceClient:
    def __init__(
        self,
        endpoint: str,
        timeout_s: float = 5.0,
        retries: int = 3,
        *,
        encoding: str = "raw",
        context: zmq.Context | None = None,
        sender: str | None = None,
        spin_us: int = 0,
        max_message_bytes: int | None = None,
    ):
        if timeout_s <= 0 or retries < 0 or spin_us < 0:
            raise CLAgentError(f"timeout_s must be > 0, retries and spin_us >= 0, got {timeout_s}, {retries}, {spin_us}")
        self.endpoint = endpoint
        self.timeout_ms = int(timeout_s * 1000)
        self.retries = retries
        self.spin_us = int(spin_us)
        self.spin_hits = 0  # replies found while spinning
        self._round_trip_s: dict[int, float] = {}  # images per request -> moving average of its round trip
        self.encoding = encoding
        self.sender = sender or f"client-{os.getpid()}-{id(self):x}"
        self._context = context or zmq.Context.instance()
        self._seq = itertools.count(1)
        self._limits = WireSection(max_message_bytes=message_limit(max_message_bytes))
        self._socket: zmq.Socket | None = None
        # The served model's input side, from a status reply, and the version it was read for;
        # the version that answered last (a change means the size may have changed too).
        self._input_size: int | None = None
        self._input_size_version: int | None = None
        self._served_version: int | None = None
        self._says_input_size = True  # False for a server whose status does not give it: not asked again

    def _connect(self) -> zmq.Socket:
        socket = self._context.socket(zmq.REQ)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.SNDTIMEO, self.timeout_ms)  # no connection to take a request: an attempt fails, no hang
        return connect(socket, self.endpoint)

    def status(self, reset_recent: bool = False) -> dict:
        """The server's model name, served version (None before the first), whether it was opened from its
        optimised graph, counters and recent timings.

        ``reset_recent``: the server forgets its recent batch timings after answering (start of a measurement).
        """
        seq = next(self._seq)
        fields = {"reset_recent": True} if reset_recent else {}
        header = self._call(encode_message("status", self.sender, seq, **fields), seq, "status")
        self._served_version = header.get("model_version")
        size = header.get("image_size")
        self._says_input_size = "image_size" in header
        known = isinstance(size, int) and not isinstance(size, bool) and size >= 1  # None: no version loaded
        self._input_size, self._input_size_version = (size, self._served_version) if known else (None, None)
        keys = ("model", "model_version", "model_optimized", "model_providers", "image_size", "counters", "recent_batches",
                "handling_ms_p50", "inference_ms_p50")
        return {k: header.get(k) for k in keys if k in header}

    def _fit_to_model(self, images) -> tuple:
        """(``images`` with those of more pixels than the model's input resized to it, the size used or None).

        Resized when the size is known for the version that answered last; asked for (``status``) only
        when ``images`` could not be sent as they are.
        """
        size = self._input_size if self._input_size_version == self._served_version else None
        if size is None and self._says_input_size and _too_large_to_send(images, self._limits):
            self.status()
            size = self._input_size
        if size is None or all(height * width <= size * size for height, width in _sizes(images)):
            return images, None
        return _fit_to_input(images, size), size

    def predict(self, images: Sequence[np.ndarray] | np.ndarray, top_k: int | None = None) -> InferenceResult:
        """Classify uint8 images: an (N, H, W, 3) or (N, H, W, 1) array, or a list of (H, W, 3), (H, W, 1) or (H, W).

        Grey images are sent as RGB with the value in every channel, as the server reads a
        one-channel image. Any size: the model sees them resized to its input, here or by the
        server, with the same resize (see the module's docstring).
        ``top_k``: an integer >= 1, or None for the server's default.
        """
        top_k = _check_top_k(top_k)
        if isinstance(images, np.ndarray) and images.ndim == 3:
            raise CLAgentError(
                f"expected (N, H, W, 3) or (N, H, W, 1) images or a list of images, got one array of shape {images.shape}"
            )
        if len(images) == 0:
            raise CLAgentError("predict needs at least one image")
        if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[3] == 1:
            images = np.repeat(images, 3, axis=3)
        elif not isinstance(images, np.ndarray):
            images = [_as_rgb(image) for image in images]
        originals = images
        images, resized_to = self._fit_to_model(images)
        seq = next(self._seq)
        fields = {} if top_k is None else {"top_k": top_k}
        if self.encoding == "raw" and _is_rgb_batch(images):
            # The common camera case, without a per-image encode call: one payload per image, as the wire wants.
            payloads = [image.tobytes() for image in images]
            request = pack_message("infer", self.sender, seq, payloads, encoding="raw", shapes=[images.shape[1:]] * len(payloads), **fields)
        else:
            try:
                request = encode_message("infer", self.sender, seq, list(images), encoding=self.encoding, **fields)
            except ValueError as e:
                raise CLAgentError(f"cannot encode the images: {e}") from None
        try:
            check_outgoing_size(request, self._limits.max_message_bytes, f"a request of {len(images)} images")
        except WireError as e:
            raise InferenceError(e.reason, f"{e.detail}; send fewer or smaller images, or JPEG") from None
        header = self._call(request, seq, "prediction", len(images))
        try:
            predictions = [[(str(name), float(p)) for name, p in image] for image in header["predictions"]]
            self._served_version = int(header["model_version"])
            result = InferenceResult(predictions, self._served_version, str(header.get("model", "")))
        except (KeyError, TypeError, ValueError) as e:
            raise InferenceError("bad_reply", f"malformed prediction: {e!r:.200}") from None
        if resized_to is not None and result.model_version != self._input_size_version:
            # A version swapped in since the size was read answered: if its input differs, the server
            # resized our resized images; ask again at its size (once per swap).
            self.status()
            if self._input_size != resized_to:
                return self.predict(originals, top_k)
        return result

    def _call(self, request: list[bytes], seq: int, expected_kind: str, images: int = 0) -> dict:
        """Send ``request`` (sequence number ``seq``, ``images`` images), Lazy Pirate style; return the reply's header."""
        for _attempt in range(self.retries + 1):
            if self._socket is None:
                self._socket = self._connect()
            sent = time.perf_counter()
            try:
                self._socket.send_multipart(request)
            except zmq.Again:  # no connection took it within the timeout
                self._socket.close()
                self._socket = None
                continue
            if self._wait_for_reply(self._socket, sent, self._round_trip_s.get(images)):
                frames = self._socket.recv_multipart()
                if self.spin_us:
                    elapsed = time.perf_counter() - sent
                    previous = self._round_trip_s.get(images, elapsed)
                    self._round_trip_s[images] = previous + 0.2 * (elapsed - previous)
                break
            # Lazy Pirate: the REQ socket is stuck waiting for a reply that is lost; start over with a new one.
            self._socket.close()
            self._socket = None
        else:
            raise InferenceError(
                "timeout", f"no reply from {self.endpoint} after {self.retries + 1} attempts of {self.timeout_ms} ms"
            )
        try:
            header = decode_reply(frames, self._limits)
        except WireError as e:
            raise InferenceError(e.reason, f"malformed reply: {e.detail}") from None
        kind = header["kind"]
        wrong = wrong_endpoint(self.endpoint, header, INFERENCE)
        if wrong:  # e.g. the agent's labeled port: a nack, not a prediction
            raise InferenceError("wrong_endpoint", wrong)
        if kind == "error":
            raise InferenceError(str(header.get("reason", "error")), str(header.get("detail", "")))
        if kind != expected_kind or header["seq"] != seq:
            raise InferenceError("bad_reply", f"expected {expected_kind} #{seq}, got {kind:.50} #{header['seq']}")
        return header

    def _wait_for_reply(self, socket: zmq.Socket, sent: float, due_s: float | None) -> bool:
        """Sleep in poll until the spin window, spin through it, then sleep for the rest of the timeout.

        ``sent``: perf_counter at the send; ``due_s``: the expected round trip (None: not known yet).
        True once a reply is there.
        """
        if not self.spin_us:
            return bool(socket.poll(self.timeout_ms))
        window_s = self.spin_us / 1e6
        spin_from = sent + max(0.0, (due_s or 0.0) - window_s / 2)
        asleep_ms = int(1000 * (spin_from - time.perf_counter()))  # whole milliseconds: poll's resolution
        if asleep_ms >= 1 and socket.poll(asleep_ms):
            return True
        spin_until = max(spin_from, time.perf_counter()) + window_s
        while time.perf_counter() < spin_until:
            if socket.poll(0):
                self.spin_hits += 1
                return True
        left_ms = self.timeout_ms - int(1000 * (time.perf_counter() - sent))
        return bool(socket.poll(max(0, left_ms)))

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def __enter__(self) -> "InferenceClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------- command line

def image_files(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The files named, and every image file (``scenario.IMAGE_SUFFIXES``, as the benchmark reads) under
    the folders named, subfolders included (``<root>/<class>/<image>`` trees), each folder's sorted by
    path; hidden files and folders are skipped, symbolic links to folders not followed."""
    from cl_agent.scenario import IMAGE_SUFFIXES

    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = []
            for folder, subfolders, names in os.walk(path):
                subfolders[:] = [name for name in subfolders if not name.startswith(".")]
                found += [Path(folder) / name for name in names
                          if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES]
            if not found:
                raise CLAgentError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)}), in it or in its subfolders")
            files += sorted(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CLAgentError(f"{path}: no such file or folder")
    return files


def print_predictions(
    client: InferenceClient, paths: Sequence[str | os.PathLike], top_k: int | None = None, as_json: bool = False
) -> int:
    """``cl-agent predict``: classify image files through a running server, one line per image, one request each.

    An unreadable image is reported on stderr and the others still go; exit code 0, or 1 if any
    image could not be read or was refused. A server that does not answer, or an endpoint that
    is not a server's, ends the command (``InferenceError``) rather than failing once per image.
    """
    import json

    import cv2
    import typer

    failed = 0
    for path in image_files(paths):
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            typer.echo(f"{path}: not an image OpenCV can read", err=True)
            failed += 1
            continue
        try:
            result = client.predict(image[None, :, :, ::-1], top_k=top_k)  # OpenCV reads BGR; the wire is RGB
        except InferenceError as e:
            if e.reason in ("timeout", "wrong_endpoint"):  # the same for every image: one error ends the command
                raise
            typer.echo(f"{path}: refused ({e.reason}): {e.detail}", err=True)
            failed += 1
            continue
        (ranked,) = result.predictions
        if as_json:
            row = {"image": str(path), "model": result.model, "model_version": result.model_version, "predictions": ranked}
            typer.echo(json.dumps(row))
        else:  # the server leaves out classes the model was never trained on
            typer.echo(f"{path}  v{result.model_version}  " + "  ".join(f"{name} {p:.3f}" for name, p in ranked))
    return 1 if failed else 0
