"""Send labeled batches from an image-folder tree (<root>/<class>/<image>) or a tar of that layout.

The class of an image is the name of the folder that holds it, so a tar with
`train/<class>/<image>` members works as is:

    python tools/send_labeled.py ../shared/datasets/tiny-imagenet-130/train.tar --endpoint tcp://127.0.0.1:5555 --limit 2000

JPEG and PNG files are sent as they are (their size is read from the header
bytes); other formats OpenCV reads are re-encoded as PNG. Every batch is acked
by the agent only once it is on disk, and only if every image in it decodes; a
refused batch is reported with its reason, and a batch refused for a full spool
or disk is retried after a pause. When the agent refuses a batch for one image
(a truncated or corrupt file: `decode_failed`, or a size it does not take), that
file is named and the rest of the batch is sent again without it.
"""

from __future__ import annotations

import argparse
import random
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Iterator

import cv2
import numpy as np

import zmq

from cl_agent.client import AgentRefused, AgentUnavailable, LabeledClient, tries
from cl_agent.config import WireSection
from cl_agent.errors import CLAgentError
from cl_agent.security import add_client_key_options, check_client_options
from cl_agent.wire import WireError, image_dimensions

AS_IS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
READABLE = {".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
RETRY_REASONS = {"spool_full", "disk_full"}
NAMED_UNREADABLE = 5  # unreadable files named in the summary; the rest are counted
MAX_BATCH = WireSection().max_parts - 1  # images per message under the default ingest.wire.max_parts (one part is the header)


def list_images(root: Path) -> list[tuple[str, str]]:
    """(member or path, class name) for every image under root (a folder or a tar file); CLAgentError if none."""
    found = []
    if not root.exists():
        raise CLAgentError(f"{root}: not found")
    if root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and path.suffix.lower() in AS_IS.keys() | READABLE and path.parent != root:
                found.append((str(path), path.parent.name))
    elif tarfile.is_tarfile(root):
        with tarfile.open(root) as tar:
            for member in tar.getmembers():
                path = PurePosixPath(member.name)
                if member.isfile() and path.suffix.lower() in AS_IS.keys() | READABLE and len(path.parts) >= 2:
                    found.append((member.name, path.parent.name))
    else:
        raise CLAgentError(f"{root} is neither a folder nor a tar file")
    if not found:
        raise CLAgentError(f"no images in {root} (expected <root>/<class>/<image>)")
    return found


def _number(kind: type, *, at_least=None, above=None):
    """An argparse type: a number of ``kind`` with a lower bound, the bad value named in the error."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if at_least is not None and not value >= at_least:
            raise argparse.ArgumentTypeError(f"must be >= {at_least}, got {text}")
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        return value

    return parse


def _only_classes(items: list[tuple[str, str]], classes: str, root: Path, parser: argparse.ArgumentParser) -> list:
    wanted = {name.strip() for name in classes.split(",") if name.strip()}
    present = sorted({label for _, label in items})
    unknown = sorted(wanted - set(present))
    if not wanted or unknown:
        shown = ", ".join(present[:20]) + (f", ... ({len(present)} in all)" if len(present) > 20 else "")
        what = f"no class {', '.join(map(repr, unknown))} in {root}" if unknown else f"no class names in {classes!r}"
        parser.error(f"--classes: {what} (classes there: {shown})")
    return [item for item in items if item[1] in wanted]


def read_bytes(root: Path, items: list[tuple[str, str]]) -> Iterator[tuple[bytes, str, str, str]]:
    """(file bytes, suffix, class, path or tar member name) in the order of items."""
    if root.is_dir():
        for path, label in items:
            yield Path(path).read_bytes(), Path(path).suffix.lower(), label, path
        return
    with tarfile.open(root) as tar:
        for name, label in items:
            yield tar.extractfile(name).read(), PurePosixPath(name).suffix.lower(), label, name


def to_payload(data: bytes, suffix: str) -> tuple[bytes, str, list[int]] | None:
    """(payload, encoding, [H, W, 3]); None if the file is not a readable image."""
    encoding = AS_IS.get(suffix)
    if encoding is not None:
        try:
            height, width, _ = image_dimensions(data, encoding)
            return data, encoding, [height, width, 3]
        except WireError:
            pass  # wrong extension or odd file: let OpenCV try
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    ok, buf = cv2.imencode(".png", image)
    return buf.tobytes(), "png", [image.shape[0], image.shape[1], 3]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder <root>/<class>/<image>, or a tar of that layout")
    parser.add_argument("--endpoint", default="tcp://127.0.0.1:5555",
                        help="the agent's labeled endpoint, its ingest.labeled_endpoint (default: %(default)s)")
    parser.add_argument("--batch", type=_number(int, at_least=1), default=32,
                        help=f"images per message, at most --max-batch: {MAX_BATCH} under the default limit "
                        f"(ingest.wire.max_parts: {MAX_BATCH + 1} parts, one of them the header) (default: %(default)s)")
    parser.add_argument("--max-batch", type=_number(int, at_least=1), default=MAX_BATCH,
                        help="the most images per message the agent takes: its ingest.wire.max_parts - 1, for an "
                        "agent with a raised limit (default: %(default)s)")
    parser.add_argument("--limit", type=_number(int, at_least=0), default=0,
                        help="send at most this many images, 0 for all (default: %(default)s)")
    parser.add_argument("--classes", default="", help="comma-separated class names to send (default: every class)")
    parser.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                        help="shuffle the images with this seed (default: in file or tar order)")
    parser.add_argument("--sender", default=None, help="sender id (default: host name + random suffix)")
    parser.add_argument("--window", type=_number(int, at_least=1), default=8,
                        help="messages in flight at once (default: %(default)s)")
    parser.add_argument("--timeout", type=_number(float, above=0), default=5.0,
                        help="seconds to wait for an ack before sending again (default: %(default)s)")
    parser.add_argument("--retries", type=_number(int, at_least=0), default=10,
                        help="times to send again without a reply before giving up (default: %(default)s)")
    parser.add_argument("--end-experience", action="store_true",
                        help="ask the agent to cut an experience at the end (default: off)")
    add_client_key_options(parser)
    args = parser.parse_args()

    check_client_options(parser, args)
    if args.batch > args.max_batch:
        default = " (the default limit; pass --max-batch for an agent with a raised ingest.wire.max_parts)" if args.max_batch == MAX_BATCH else " (--max-batch)"
        parser.error(f"--batch {args.batch}: the agent takes at most {args.max_batch} images per message{default}")
    try:
        items = list_images(args.root)
    except CLAgentError as e:
        parser.error(str(e))
    except (OSError, tarfile.TarError) as e:
        parser.error(f"cannot read {args.root}: {e}")
    if args.classes:
        items = _only_classes(items, args.classes, args.root, parser)
    if args.shuffle is not None:
        random.Random(args.shuffle).shuffle(items)
    if args.limit:
        items = items[: args.limit]
    try:
        client = LabeledClient(
            args.endpoint, args.sender, timeout_s=args.timeout, retries=args.retries, window=args.window,
            curve_secret_key=args.curve_secret, curve_server_key=args.curve_server,
        )
    except (CLAgentError, zmq.ZMQError) as e:  # the message names the endpoint
        parser.error(f"--endpoint: {e}")
    sent = acked = refused = 0
    unreadable: list[str] = []
    refused_files: list[str] = []  # refused by the agent for what is in the file
    batches: dict[int, tuple] = {}
    start = time.perf_counter()

    def settle(acks) -> None:
        nonlocal acked, refused
        for ack in acks:
            batch = batches.pop(ack.seq)
            image = ack.header.get("image")
            if ack.ok:
                acked += len(batch[0])
            elif ack.reason in RETRY_REASONS:
                print(f"batch refused ({ack.reason}): retrying in 1 s", file=sys.stderr)
                time.sleep(1.0)
                batches[client.submit_encoded(*batch[:3], encoding=batch[3])] = batch
            elif type(image) is int and 0 <= image < len(batch[0]):
                # The agent refused the whole batch for this one image: name its file, send the others again.
                refused += 1
                refused_files.append(batch[4][image])
                print(f"{batch[4][image]} refused: {ack.reason}: {ack.detail}", file=sys.stderr)
                keep = [i for i in range(len(batch[0])) if i != image]
                if keep:
                    payloads, shapes, labels, encoding, names = batch
                    rest = ([payloads[i] for i in keep], [shapes[i] for i in keep], [labels[i] for i in keep], encoding, [names[i] for i in keep])
                    batches[client.submit_encoded(*rest[:3], encoding=encoding)] = rest
            else:
                refused += len(batch[0])
                print(f"batch of {len(batch[0])} refused: {ack.reason}: {ack.detail}", file=sys.stderr)

    def flush_group(group) -> None:
        # One message per encoding (a message has a single encoding).
        for encoding in sorted({g[1] for g in group}):
            part = [g for g in group if g[1] == encoding]
            batch = ([g[0] for g in part], [g[2] for g in part], [g[3] for g in part], encoding, [g[4] for g in part])
            batches[client.submit_encoded(*batch[:3], encoding=encoding)] = batch
            settle(client.poll_acks())

    try:
        group = []
        for data, suffix, label, name in read_bytes(args.root, items):
            converted = to_payload(data, suffix)
            if converted is None:
                unreadable.append(name)
                continue
            group.append((*converted, label, name))
            sent += 1
            if len(group) == args.batch:
                flush_group(group)
                group = []
        if group:
            flush_group(group)
        while batches:
            settle(client.flush())
        if args.end_experience:
            ack = client.end_experience()
            print(f"end of experience: {'experience ' + str(ack.experience) if ack.ok else ack.reason}")
    except AgentRefused as e:  # the handshake was refused (CURVE): no reply could ever come
        stored = f"{acked} images were acked before it" if acked else "nothing is known to be stored"
        print(f"error: {e.refusal}; {stored}", file=sys.stderr)
        return 1
    except AgentUnavailable:
        waited = f"{tries(args.retries + 1)} of {args.timeout:g} s each"
        if acked:
            print(f"error: the agent at {args.endpoint} stopped answering ({waited}) after {acked} images were acked; "
                  "the others are not known to be stored", file=sys.stderr)
        else:
            print(f"error: no reply came from {args.endpoint} ({waited}); nothing is known to be stored. Is the agent "
                  "running, and is --endpoint its ingest.labeled_endpoint (not the frame or control endpoint)?",
                  file=sys.stderr)
        return 1
    except (OSError, tarfile.TarError) as e:
        print(f"error: cannot read {args.root}: {e} ({acked} images acked before it)", file=sys.stderr)
        return 1
    finally:
        client.close()
    elapsed = time.perf_counter() - start
    print(f"{acked} images acked, {refused} refused, {len(unreadable)} unreadable, {elapsed:.1f} s ({acked / max(elapsed, 1e-9):.0f} images/s)")
    if refused_files:
        more = len(refused_files) - NAMED_UNREADABLE
        print(f"the agent refused {len(refused_files)} {'file' if len(refused_files) == 1 else 'files'}: "
              f"{', '.join(refused_files[:NAMED_UNREADABLE])}" + (f" and {more} more" if more > 0 else ""), file=sys.stderr)
    if unreadable:
        more = len(unreadable) - NAMED_UNREADABLE
        files = "file" if len(unreadable) == 1 else "files"
        print(f"skipped {len(unreadable)} {files} OpenCV cannot read as an image: {', '.join(unreadable[:NAMED_UNREADABLE])}"
              + (f" and {more} more" if more > 0 else ""), file=sys.stderr)
    return 0 if refused == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
