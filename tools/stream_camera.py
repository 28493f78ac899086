"""Stream frames from an OpenCV source (camera index, video file or RTSP URL) to the agent's frame socket.

    python tools/stream_camera.py 0 --endpoint tcp://127.0.0.1:5556 --width 640 --height 480 --quality 80 --fps 15
    python tools/stream_camera.py clip.mp4 --loop
    python tools/stream_camera.py rtsp://camera.local/stream --socket pub

Frames are JPEG-encoded here and sent without blocking: a frame the agent
cannot take right now is dropped (and counted), so a slow agent never stalls
the camera.

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
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import zmq

from cl_agent.client import FrameClient, NotConnected, PeerRefused
from cl_agent.config import endpoint_problem
from cl_agent.errors import CLAgentError
from cl_agent.security import client_keys_problem


def open_source(source: str) -> cv2.VideoCapture | None:
    """The opened capture, or None when OpenCV cannot open ``source``."""
    capture = cv2.VideoCapture(int(source) if source.isdigit() else source)
    if not capture.isOpened():
        capture.release()
        return None
    return capture


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
    parser.add_argument("source", help="camera index (0), video file, or RTSP/HTTP URL")
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
    parser.add_argument("--loop", action="store_true", help="restart a video file at its end (default: off)")
    parser.add_argument("--connect-timeout", type=_number(float, 0, above=True), default=10.0,
                        help="seconds to wait for the agent to take the connection before the first frame; "
                        "none by then is an error (default: %(default)s)")
    parser.add_argument("--linger", type=_number(float, 0), default=1.0,
                        help="seconds queued frames still get to go out at the end (default: %(default)s)")
    parser.add_argument("--sender", default=None, help="sender id (default: camera-<random suffix>)")
    parser.add_argument("--curve-secret", type=Path, default=None,
                        help="this client's CURVE secret key file (default: none, no CURVE)")
    parser.add_argument("--curve-server", type=Path, default=None,
                        help="the agent's CURVE public key file (default: none, no CURVE)")
    args = parser.parse_args()
    problem = endpoint_problem(args.endpoint)
    if problem:
        parser.error(f"--endpoint {args.endpoint!r}: {problem}")
    keys_problem = client_keys_problem(args.curve_secret, args.curve_server)
    if keys_problem:
        parser.error(keys_problem)

    capture = open_source(args.source)
    if capture is None:
        parser.error(f"OpenCV cannot open the source {args.source!r} (a camera index, a video file, or an RTSP/HTTP URL)")
    try:
        frames = FrameClient(
            args.endpoint, args.sender, socket_type=args.socket,
            curve_secret_key=args.curve_secret, curve_server_key=args.curve_server,
        )
    except (CLAgentError, zmq.ZMQError) as e:
        capture.release()
        parser.error(f"--endpoint: {e}")  # the message names the endpoint
    interval = 1.0 / args.fps if args.fps > 0 else 0.0
    count = 0
    start = time.monotonic()
    failed: CLAgentError | None = None
    try:
        # Nothing is read or counted before the agent has taken the connection: frames queued in a socket
        # that never connects would be reported sent and then thrown away.
        frames.require_connected(args.connect_timeout)
        next_time = start = time.monotonic()
        while not args.max_frames or count < args.max_frames:
            ok, bgr = capture.read()
            if not ok:
                if args.loop and not args.source.isdigit():
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
            frames.send_encoded(jpeg.tobytes(), [bgr.shape[0], bgr.shape[1], 3])
            count += 1
            if interval:
                next_time += interval
                delay = next_time - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                else:
                    next_time = time.monotonic()
    except KeyboardInterrupt:
        pass
    except (NotConnected, PeerRefused) as e:  # nothing listens there, or it does not pair with --socket
        failed = e
    finally:
        capture.release()
        try:
            frames.check()  # the latest connection state, for the summary
        except PeerRefused as e:
            failed = failed or e
        down_at_end = not frames.connected
        frames.close(args.linger)
    elapsed = max(time.monotonic() - start, 1e-9)
    live = frames.sent - frames.sent_unconnected
    if count or failed is None:
        print(f"{live} frames sent, {frames.dropped} dropped, {count / elapsed:.1f} frames/s")
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
