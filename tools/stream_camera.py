"""Stream frames from a camera, video, stream URL or image folder to the agent's frame socket.

    python tools/stream_camera.py 0 --endpoint tcp://127.0.0.1:5556 --width 640 --height 480 --quality 80 --fps 15
    python tools/stream_camera.py clip.mp4 --loop
    python tools/stream_camera.py rtsp://camera.local/stream --socket pub
    python tools/stream_camera.py frames/ --fps 5          # every image in the folder, sorted by name
    python tools/stream_camera.py 'frames/img_%06d.jpg'    # OpenCV's numbered-image pattern

Sources: a camera index, a video file, an RTSP/HTTP URL, a folder of images
(JPEG, PNG, BMP, WebP; sorted by file name; not its subfolders; an image that
cannot be read is skipped with a warning), or OpenCV's pattern for numbered
images (``img_%06d.jpg``: img_000000.jpg, img_000001.jpg, ... from the first
number found, until a number is missing). --loop restarts a video, a folder or
a pattern at its end.

Frames are JPEG-encoded here. From a live source (a camera index or a stream
URL) they are sent without blocking: a frame the agent cannot take right now is
dropped (and counted), so a slow agent never stalls the camera and the next
frame is fresh. A video file, a folder or a pattern is a recording: the tool
waits until the agent takes each frame, and none is dropped. --busy drop|wait
chooses otherwise.

Before the first frame the tool waits (--connect-timeout) until the agent has
taken the connection, and stops with exit status 1 and an error naming the
endpoint and the likely cause when it has not: nothing listening there, or an
agent that refused the handshake. --socket must pair with the agent's
ingest.frame_socket: push for pull (the default), pub for sub; ZeroMQ refuses a
mismatched pair during the handshake and would drop every frame without a word.
The same holds when only one side uses CURVE (--curve-secret/--curve-server
against ingest.curve.enabled).

Frames the socket took while the connection was down (the agent restarted)
are counted apart from the ones sent over a live connection: they arrive only
if it comes back in time. At the end queued frames get --linger seconds to go
out; the tool says so when the connection was down then.

Every --progress seconds (10 by default) a line reports the frames sent,
dropped and queued so far; a live camera that runs for hours is not silent.
SIGTERM (systemd, docker stop) ends the tool as Ctrl-C does: the summary is
printed and the exit status is 0, whenever the signal comes (a signal while the
tool is already ending does not cut the summary short).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import zmq

from cl_agent.client import FrameClient, NotConnected, PeerRefused, connect, refused_message
from cl_agent.errors import CLAgentError
from cl_agent.interrupt import InterruptOnce
from cl_agent.peer import FRAME, answering_role
from cl_agent.security import add_client_key_options, check_client_options
from cl_agent.wire import pack_message

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
PROBE_TIMEOUT_S = 1.0  # how long a refused endpoint gets to say what it is


class ImageFolder:
    """The images of a folder, sorted by file name, read like a ``cv2.VideoCapture`` (read, set, release)."""

    def __init__(self, folder: Path):
        self.paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                            and not p.name.startswith("."))
        self.position = 0
        self.unreadable: list[Path] = []

    def read(self) -> tuple[bool, np.ndarray | None]:
        """The next image (BGR) that OpenCV can read; (False, None) after the last one."""
        while self.position < len(self.paths):
            path = self.paths[self.position]
            self.position += 1
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if image is not None:
                return True, image
            if path not in self.unreadable:
                self.unreadable.append(path)
                print(f"warning: {path}: not an image OpenCV can read; skipped", file=sys.stderr)
        return False, None

    def set(self, prop: int, value: float) -> bool:
        """Only ``cv2.CAP_PROP_POS_FRAMES``: go to image ``value`` (0: the first, for --loop)."""
        if prop != cv2.CAP_PROP_POS_FRAMES:
            return False
        self.position = int(value)
        return True

    def release(self) -> None:
        pass


SOURCES = ("a camera index, a video file, an RTSP/HTTP URL, a folder of images, or a pattern of numbered images "
           "like frames/img_%06d.jpg")


def missing_path(source: str) -> str | None:
    """The error for a source that names a folder or file that does not exist; None for one that exists, a camera
    index, a URL, an OpenCV pattern (``%``) or a GStreamer pipeline (``!``), which only OpenCV can judge."""
    if source.isdigit() or "://" in source or "%" in source or "!" in source or Path(source).exists():
        return None
    kind = "folder" if source.endswith(("/", os.sep)) else "file or folder"
    return f"{kind} not found: {source!r} (a source is {SOURCES})"


def open_source(source: str) -> cv2.VideoCapture | ImageFolder | None:
    """The opened capture (an ``ImageFolder`` for a folder), or None when OpenCV cannot open ``source``.

    Raises CLAgentError for a folder or file that does not exist, and for a folder without images."""
    missing = missing_path(source)
    if missing is not None:
        raise CLAgentError(missing)
    if Path(source).is_dir():
        folder = ImageFolder(Path(source))
        if not folder.paths:
            raise CLAgentError(f"the folder {source} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return folder
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        capture.release()
        return None
    return capture


_SOCKETS = {"push": ("PUSH", "PULL", "pull", "pub", "sub"), "pub": ("PUB", "SUB", "sub", "push", "pull")}


def probe(endpoint: str, curve: tuple, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """What answers at ``endpoint`` (a ROUTER or REP: the agent's labeled or control port, a server, the
    fetch port, a frame socket in router mode), asked with a ``status`` request; None when nothing answers."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    try:
        connect(sock, endpoint, curve)
        sock.send_multipart([b"", *pack_message("status", "camera-probe", 1)])
        if not sock.poll(int(timeout_s * 1000)):
            return None
        answer = sock.recv_multipart()[-1]
    finally:
        sock.close(0)
    if answer.startswith(b"ERROR") or answer == b"OK":  # the one-part answer of a frame socket in router mode
        return (f"{FRAME.name} with ingest.frame_socket: router (for imagezmq REQ senders), which this tool cannot "
                "feed; set ingest.frame_socket: pull on the agent (or sub, with --socket pub)")
    try:
        header = json.loads(answer)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    role = answering_role(header) if isinstance(header, dict) else None
    return None if role is None else f"{role}; point --endpoint at {FRAME.key} (default port {FRAME.port})"


def refusal(endpoint: str, socket_type: str, curve: tuple) -> str:
    """The error for a connection refused in the handshake: what answers there, if it says, else the likely causes
    with the wrong endpoint first (the socket-type mismatch is the rarer mistake)."""
    ours, theirs, value, other, other_value = _SOCKETS[socket_type]
    found = probe(endpoint, curve)
    if found is not None:
        return f"{endpoint} refused a {ours} connection: it is not the agent's frame endpoint, it answers as {found}"
    return (
        f"{endpoint} refused a {ours} connection. It may not be the agent's frame endpoint ({FRAME.key}, default "
        f"port {FRAME.port}; not the labeled, control, inference or fetch one): check --endpoint. If it is, the "
        f"agent's frame socket is not a {theirs}: use --socket {other} (for ingest.frame_socket: {other_value}) "
        f"or set ingest.frame_socket: {value} on the agent"
    )


def is_live(source: str) -> bool:
    """A camera index or a stream URL: a source that will not wait for the agent (its frames are fresh or lost)."""
    return source.isdigit() or "://" in source


def _number(kind: type, low, high=None, *, above: bool = False):
    """An argparse type: a number of ``kind`` >= low (> low with ``above``) and <= high, the bad value named."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if (value <= low) if above else (value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if above else '>='} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    return parse


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Before streaming, the tool waits up to --connect-timeout seconds for the agent to take the "
        "connection. --socket must pair with the agent's ingest.frame_socket (push: pull, pub: sub). No agent at "
        "--endpoint, a mismatch, or CURVE on one side only stops the tool with exit status 1 and an error naming "
        "the endpoint and the fix, instead of losing every frame.",
    )
    parser.add_argument("source", help="camera index (0), video file, RTSP/HTTP URL, a folder of images (sorted by "
                        "name), or an OpenCV pattern of numbered images (frames/img_%%06d.jpg)")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5556",
                        help="the agent's frame endpoint, its ingest.frame_endpoint (default: %(default)s)")
    parser.add_argument("--socket", choices=["push", "pub"], default="push",
                        help="push (agent ingest.frame_socket: pull) or pub (agent: sub); a mismatch stops the tool "
                        "with an error (default: %(default)s)")
    parser.add_argument("--width", type=_number(int, 0), default=0,
                        help="resize to this width, 0 to keep it; with only one of width/height the aspect is kept "
                        "(default: %(default)s)")
    parser.add_argument("--height", type=_number(int, 0), default=0, help="resize to this height, 0 to keep it (default: %(default)s)")
    parser.add_argument("--quality", type=_number(int, 1, 100), default=80, help="JPEG quality 1-100 (default: %(default)s)")
    parser.add_argument("--fps", type=_number(float, 0), default=0.0,
                        help="frame-rate cap, 0 for as fast as the source (default: %(default)s)")
    parser.add_argument("--max-frames", type=_number(int, 0), default=0,
                        help="stop after this many frames, 0 for never (default: %(default)s)")
    parser.add_argument("--loop", action="store_true", help="restart a video file, folder or pattern at its end (default: off)")
    parser.add_argument("--progress", type=_number(float, 0), default=10.0,
                        help="print frames sent, dropped and queued every this many seconds, 0 for never "
                        "(default: %(default)s)")
    parser.add_argument("--connect-timeout", type=_number(float, 0, above=True), default=10.0,
                        help="seconds to wait for the agent to take the connection before the first frame; "
                        "none by then is an error (default: %(default)s)")
    parser.add_argument("--linger", type=_number(float, 0), default=1.0,
                        help="seconds queued frames still get to go out at the end (default: %(default)s)")
    parser.add_argument("--sender", default=None, help="sender id (default: camera-<random suffix>)")
    parser.add_argument("--busy", choices=["wait", "drop"], default=None,
                        help="what to do with a frame the agent cannot take right now: drop it (and count it), so "
                        "that a live camera's next frame is fresh, or wait until the socket takes it, so that no "
                        "frame of a recording is lost (default: drop for a camera index or a stream URL, wait for "
                        "a video file, a folder or a pattern)")
    add_client_key_options(parser)
    args = parser.parse_args()
    check_client_options(parser, args)
    wait_when_busy = (args.busy or ("drop" if is_live(args.source) else "wait")) == "wait"

    stop = InterruptOnce()
    stop.install()
    capture = frames = None
    interval = 1.0 / args.fps if args.fps > 0 else 0.0
    count = 0
    start = time.monotonic()
    failed: CLAgentError | str | None = None  # a str: the refusal reworded after probing the endpoint
    try:
        try:
            try:
                capture = open_source(args.source)
            except (CLAgentError, OSError) as e:
                parser.error(str(e))
            if capture is None:
                parser.error(f"OpenCV cannot open the source {args.source!r} ({SOURCES})")
            try:
                frames = FrameClient(
                    args.endpoint, args.sender, socket_type=args.socket,
                    curve_secret_key=args.curve_secret, curve_server_key=args.curve_server,
                )
            except (CLAgentError, zmq.ZMQError) as e:
                capture.release()
                parser.error(f"--endpoint: {e}")  # the message names the endpoint
            # Nothing is read or counted before the agent has taken the connection: frames queued in a socket
            # that never connects would be reported sent and then thrown away.
            frames.require_connected(args.connect_timeout)
            next_time = start = time.monotonic()
            next_progress = start + args.progress
            while not args.max_frames or count < args.max_frames:
                if args.progress and time.monotonic() >= next_progress:
                    next_progress += args.progress
                    print(f"{frames.sent - frames.sent_unconnected} frames sent, {frames.dropped} dropped, "
                          f"{frames.sent_unconnected} queued while the connection was down, "
                          f"{count / (time.monotonic() - start):.1f} frames/s", flush=True)
                ok, bgr = capture.read()
                if not ok:
                    if args.loop and not args.source.isdigit():  # a video, a folder or a pattern starts over
                        capture.set(cv2.CAP_PROP_POS_FRAMES, 0)
                        ok, bgr = capture.read()
                    if not ok:
                        break
                if args.width or args.height:
                    h, w = bgr.shape[:2]
                    width = args.width or round(w * args.height / h)
                    height = args.height or round(h * args.width / w)
                    bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA)
                # OpenCV frames are BGR; the JPEG holds the true colours, so the agent decodes them as RGB.
                ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, args.quality])
                if not ok:
                    continue
                frames.send_encoded(jpeg.tobytes(), [bgr.shape[0], bgr.shape[1], 3], wait=wait_when_busy)
                count += 1
                if interval:
                    next_time += interval
                    delay = next_time - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    else:
                        next_time = time.monotonic()
        finally:
            stop.armed = False  # the stream has ended: a signal from now on must not cut the clean-up or the summary
    except KeyboardInterrupt:
        pass
    except (NotConnected, PeerRefused) as e:  # nothing listens there, or it does not pair with --socket
        failed = e
    if capture is not None:
        capture.release()
    if frames is None:  # interrupted before the socket was set up
        print("0 frames sent, 0 dropped, 0.0 frames/s", flush=True)
        return 0
    try:
        frames.check()  # the latest connection state, for the summary
    except PeerRefused as e:
        failed = failed or e
    down_at_end = not frames.connected
    frames.close(args.linger)
    if isinstance(failed, PeerRefused) and str(failed) == refused_message(args.endpoint, args.socket):
        failed = refusal(args.endpoint, args.socket, (args.curve_secret, args.curve_server))
    elapsed = max(time.monotonic() - start, 1e-9)
    live = frames.sent - frames.sent_unconnected
    if count or failed is None:
        print(f"{live} frames sent, {frames.dropped} dropped, {count / elapsed:.1f} frames/s", flush=True)
    if frames.sent_unconnected:
        print(f"{parser.prog}: warning: {frames.sent_unconnected} more frames were queued while the connection to "
              f"{args.endpoint} was down (the agent away or restarting); they were delivered only if it came back "
              "before the end", file=sys.stderr)
    if failed is not None:
        print(f"{parser.prog}: error: {failed}", file=sys.stderr)
        return 1
    if down_at_end and count:
        print(f"{parser.prog}: warning: the connection to {args.endpoint} was down at the end; frames still "
              f"queued then were discarded after --linger {args.linger:g} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
