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

Images are sent in listing order: a folder's files sorted by path (symlinked
class folders are followed), a tar's members in the order they are stored;
then --classes, --shuffle (with a seed, the same order every run), --skip and
--limit apply in that order. Image files at the root of a folder (no class
folder) are skipped with one warning. --max-side scales larger images down
(aspect kept) before they are sent; without it the agent refuses images over
its limit (4,096 px by default).

Ctrl-C (or SIGTERM) stops the tool with exit status 130 and a summary of what
the agent acked and what it did not (it first waits up to a second for the acks
of the messages in flight; a second Ctrl-C ends that wait). The summary names the
--sender, --seq-base, --skip and --limit of a run that sends only the rest. Every
message's seq follows from --seq-base and the message's place in the listing, so
that run sends a message again under the (sender, seq) it had: one the agent
stored before the interruption is acked as a duplicate and not stored twice. Use
--seq-base only that way (the same listing, --batch and --max-side): a message
with other images under a stored (sender, seq) would be acked and not stored.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tarfile
import time
from pathlib import Path, PurePosixPath
from typing import Iterator

import cv2
import numpy as np

import zmq

from cl_agent.client import AgentRefused, AgentUnavailable, LabeledClient, default_sender, tries
from cl_agent.config import WireSection
from cl_agent.errors import CLAgentError
from cl_agent.interrupt import InterruptOnce
from cl_agent.security import add_client_key_options, check_client_options
from cl_agent.wire import WireError, image_dimensions

AS_IS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png"}
READABLE = {".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
RETRY_REASONS = {"spool_full", "disk_full"}
NAMED_UNREADABLE = 5  # unreadable files named in the summary; the rest are counted
JPEG_QUALITY = 95  # a JPEG scaled down by --max-side is encoded again at this quality
SETTLED, HANDED = 1, 2  # what became of an image of the listing (0: not sent yet)
INTERRUPTED = 130  # the exit status after Ctrl-C or SIGTERM (128 + SIGINT, as a shell reports it)
GRACE_S = 1.0  # after Ctrl-C, the longest wait for the acks of the messages in flight before the summary
MAX_BATCH = WireSection().max_parts - 1  # images per message under the default ingest.wire.max_parts (one part is the header)


def _walk(root: Path) -> Iterator[Path]:
    """Every file under root, following symlinked folders; a folder reached twice (a symlink loop, or two links
    to one folder) is walked once."""
    seen: set[tuple[int, int]] = set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        for name in files:
            yield Path(folder) / name


def list_images(root: Path, warn=None) -> list[tuple[str, str]]:
    """(member or path, class name) for every image under root (a folder or a tar file), in listing order: a
    folder's sorted by path, a tar's in member order; CLAgentError if none. Image files at the root of a folder
    have no class: ``warn`` (a function of one message) is told about them once."""
    found = []
    if not root.exists():
        raise CLAgentError(f"{root}: not found")
    if root.is_dir():
        loose = []
        for path in sorted(_walk(root)):
            if path.suffix.lower() in AS_IS.keys() | READABLE and path.is_file():
                (loose if path.parent == root else found).append(path)
        found = [(str(path), path.parent.name) for path in found]
        if loose and warn is not None:
            warn(f"skipped {len(loose)} image {'file' if len(loose) == 1 else 'files'} at the top of {root} "
                 f"(e.g. {loose[0]}): an image's class is the folder that holds it, <root>/<class>/<image>")
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


def to_payload(data: bytes, suffix: str, max_side: int = 0) -> tuple[bytes, str, list[int]] | None:
    """(payload, encoding, [H, W, 3]); None if the file is not a readable image. With ``max_side`` an image
    whose longer side is above it is scaled down to it (aspect kept) and encoded again (a JPEG as JPEG)."""
    encoding = AS_IS.get(suffix)
    if encoding is not None:
        try:
            height, width, _ = image_dimensions(data, encoding)
            if not max_side or max(height, width) <= max_side:
                return data, encoding, [height, width, 3]
        except WireError:
            pass  # wrong extension or odd file: let OpenCV try
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    if max_side and max(image.shape[:2]) > max_side:
        scale = max_side / max(image.shape[:2])
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    else:
        ok, buf = cv2.imencode(".png", image)
        encoding = "png"
    return buf.tobytes(), encoding, [image.shape[0], image.shape[1], 3]


def _experience_end(ack) -> str:
    """What became of --end-experience, in words."""
    if ack.ok:
        return f"experience {ack.experience}"
    if ack.reason == "nothing_to_cut":
        return ("nothing to cut: the open experience is empty (the agent already cut it, e.g. by count, "
                "or every image sent was stored before)")
    return f"refused: {ack.reason}" + (f": {ack.detail}" if ack.detail else "")


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
    parser.add_argument("--skip", type=_number(int, at_least=0), default=0,
                        help="leave out the first N images of the listing (after --classes and --shuffle, before "
                        "--limit): the summary of an interrupted run names the N that sends only the rest "
                        "(default: %(default)s)")
    parser.add_argument("--max-side", type=_number(int, at_least=1), default=None, metavar="PX",
                        help="scale an image whose longer side is above PX down to PX, aspect kept, before sending "
                        "(the agent refuses images over its limit, 4096 px by default) (default: off)")
    parser.add_argument("--classes", default="", help="comma-separated class names to send (default: every class)")
    parser.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                        help="shuffle the images with this seed, the same order every run (default: a folder's "
                        "files sorted by path, a tar's members in stored order)")
    parser.add_argument("--sender", default=None, help="sender id (default: host name + random suffix)")
    parser.add_argument("--seq-base", type=_number(int, at_least=0), default=None, metavar="SEQ",
                        help="the seq of this run's first message; the others follow in listing order. Pass the "
                        "one the summary of an interrupted run names, with its --sender, --skip and --limit: "
                        "messages sent again keep their (sender, seq), and the agent does not store them twice "
                        "(default: the current time in microseconds)")
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
    stop = InterruptOnce()
    stop.install()
    try:
        return _send(parser, args, stop)
    except KeyboardInterrupt:  # only before the first image was read: _send reports its own interruptions
        print("interrupted before any image was sent", file=sys.stderr)
        return INTERRUPTED


def _send(parser: argparse.ArgumentParser, args: argparse.Namespace, stop: InterruptOnce) -> int:
    if args.batch > args.max_batch:
        default = " (the default limit; pass --max-batch for an agent with a raised ingest.wire.max_parts)" if args.max_batch == MAX_BATCH else " (--max-batch)"
        parser.error(f"--batch {args.batch}: the agent takes at most {args.max_batch} images per message{default}")
    try:
        items = list_images(args.root, warn=lambda message: print(f"{parser.prog}: warning: {message}", file=sys.stderr))
    except CLAgentError as e:
        parser.error(str(e))
    except (OSError, tarfile.TarError) as e:
        parser.error(f"cannot read {args.root}: {e}")
    if args.classes:
        items = _only_classes(items, args.classes, args.root, parser)
    if args.shuffle is not None:
        random.Random(args.shuffle).shuffle(items)
    if args.skip >= len(items):
        parser.error(f"--skip {args.skip}: no images left to send (the listing has {len(items)})")
    items = items[args.skip:]
    if args.limit:
        items = items[: args.limit]
    sender = args.sender or default_sender()
    seq_base = time.time_ns() // 1000 if args.seq_base is None else args.seq_base
    try:
        client = LabeledClient(
            args.endpoint, sender, timeout_s=args.timeout, retries=args.retries, window=args.window,
            start_seq=seq_base, curve_secret_key=args.curve_secret, curve_server_key=args.curve_server,
        )
    except (CLAgentError, zmq.ZMQError) as e:  # the message names the endpoint
        parser.error(f"--endpoint: {e}")
    sent = acked = refused = acked_batches = duplicates = 0
    # per image of items: SETTLED once acked, refused by the agent, or unreadable; HANDED once given to the client
    settled = bytearray(len(items))
    # Messages are numbered in listing order from seq_base: the messages of a group of --batch images (one per
    # encoding) take the next seqs. A message sent again (a spool_full retry, or the rest of a batch after the
    # agent refused one image of it, whose first form was not stored) keeps its seq. So a run that starts at a
    # group's first image, with the seq that group had, sends the same messages under the same (sender, seq).
    group_of = [-1] * len(items)  # per image: the position of the first image of its group (-1: not in one yet)
    group_seq: dict[int, int] = {}  # position of a group's first image -> the seq of its first message
    next_seq = seq_base
    unreadable: list[str] = []
    refused_files: list[str] = []  # refused by the agent for what is in the file
    batches: dict[int, tuple] = {}
    start = time.perf_counter()

    def submit(batch, seq: int) -> None:
        client.next_seq = seq  # the message's own seq (see group_seq), not the client's next one
        try:
            client.submit_encoded(*batch[:3], encoding=batch[3])
        finally:
            # The client counts a message on before it goes to the socket: one interrupted while the client
            # waited for room in its window never reached it (not sent); one interrupted later may be sent.
            if client.next_seq != seq:
                batches[seq] = batch

    def took(ack, batch) -> None:
        nonlocal acked, acked_batches, duplicates
        acked += len(batch[0])
        acked_batches += 1
        if ack.duplicate:
            duplicates += len(batch[0])
        for position in batch[5]:
            settled[position] = SETTLED

    def settle(acks) -> None:
        nonlocal refused
        for ack in acks:
            batch = batches.pop(ack.seq)
            image = ack.header.get("image")
            if ack.ok:
                took(ack, batch)
            elif ack.reason in RETRY_REASONS:
                print(f"batch refused ({ack.reason}): retrying in 1 s", file=sys.stderr)
                time.sleep(1.0)
                submit(batch, ack.seq)
            elif type(image) is int and 0 <= image < len(batch[0]):
                # The agent refused the whole batch for this one image: name its file, send the others again.
                refused += 1
                refused_files.append(batch[4][image])
                settled[batch[5][image]] = SETTLED
                print(f"{batch[4][image]} refused: {ack.reason}: {ack.detail}", file=sys.stderr)
                keep = [i for i in range(len(batch[0])) if i != image]
                if keep:
                    payloads, shapes, labels, encoding, names, positions = batch
                    rest = ([payloads[i] for i in keep], [shapes[i] for i in keep], [labels[i] for i in keep], encoding,
                            [names[i] for i in keep], [positions[i] for i in keep])
                    submit(rest, ack.seq)  # nothing is stored under its seq: the agent refused the batch
            else:
                refused += len(batch[0])
                for position in batch[5]:
                    settled[position] = SETTLED
                print(f"batch of {len(batch[0])} refused: {ack.reason}: {ack.detail}", file=sys.stderr)

    def flush_group(group) -> None:
        # One message per encoding (a message has a single encoding), numbered in that order.
        nonlocal next_seq
        group_seq[group[0][5]] = next_seq
        for encoding in sorted({g[1] for g in group}):
            part = [g for g in group if g[1] == encoding]
            batch = ([g[0] for g in part], [g[2] for g in part], [g[3] for g in part], encoding, [g[4] for g in part],
                     [g[5] for g in part])
            for position in batch[5]:
                settled[position] = HANDED
            seq, next_seq = next_seq, next_seq + 1
            submit(batch, seq)
            settle(client.poll_acks())

    def resume() -> str:
        """How to send only what is not settled yet ("" when nothing is left): a run from the first image of the
        group that holds the first image not settled, with that group's seqs, which sends its messages (and
        those after it) under the (sender, seq) they had here: the agent acks those it stored as duplicates."""
        first = next((i for i, state in enumerate(settled) if state != SETTLED), None)
        if first is None:
            return ""
        start = group_of[first] if group_of[first] >= 0 else first
        limit = f" --limit {args.limit - start}" if args.limit else ""
        again = f", {first - start} of them sent again" if first > start else ""
        return (f"the first {first} images of the listing are settled: to send the rest{again}, run again with the "
                f"same arguments and --sender {sender} --seq-base {group_seq.get(start, next_seq)} "
                f"--skip {args.skip + start}{limit} (a message the agent stored before is acked as a duplicate, "
                "not stored twice)")

    group = []
    try:
        try:
            for position, (data, suffix, label, name) in enumerate(read_bytes(args.root, items)):
                converted = to_payload(data, suffix, args.max_side or 0)
                if converted is None:
                    unreadable.append(name)
                    settled[position] = SETTLED
                    continue
                group.append((*converted, label, name, position))
                group_of[position] = group[0][5]
                sent += 1
                if len(group) == args.batch:
                    flush_group(group)
                    group = []
            if group:
                flush_group(group)
            while batches:
                settle(client.flush())
            if args.end_experience:
                client.next_seq = next_seq  # after every seq of this run's messages
                ack = client.end_experience()
                print(f"end of experience: {_experience_end(ack)}")
        finally:
            stop.armed = False  # what follows (closing, the summary) is not cut short by a signal
    except KeyboardInterrupt:
        # The acks the client took in before the interruption, and those of the messages in flight that come
        # within GRACE_S (fewer images left "not known to be stored"); a second Ctrl-C ends the wait.
        signals, deadline = stop.signals, time.monotonic() + GRACE_S
        while True:
            for ack in client.poll_acks(timeout_s=min(0.1, max(0.0, deadline - time.monotonic()))):
                batch = batches.pop(ack.seq, None)
                if batch is not None and ack.ok:
                    took(ack, batch)
            if not batches or not client.in_flight or time.monotonic() >= deadline or stop.signals > signals:
                break
        # Submitted and not answered: sent, maybe stored (see submit).
        waiting = sum(len(batch[0]) for batch in batches.values())
        unsent = settled.count(0) + settled.count(HANDED) - waiting
        print(f"interrupted: {acked} images acked in {acked_batches} {'batch' if acked_batches == 1 else 'batches'}, "
              f"{refused} refused, {len(unreadable)} unreadable; {waiting} sent and not acked (not known to be stored), "
              f"{unsent} not sent")
        print(resume() or "every image was settled before the interruption")
        return INTERRUPTED
    except AgentRefused as e:  # the handshake was refused (CURVE): no reply could ever come
        stored = f"{acked} images were acked before it" if acked else "nothing is known to be stored"
        print(f"error: {e.refusal}; {stored}", file=sys.stderr)
        return 1
    except AgentUnavailable:
        waited = f"{tries(args.retries + 1)} of {args.timeout:g} s each"
        if acked:
            print(f"error: the agent at {args.endpoint} stopped answering ({waited}) after {acked} images were acked; "
                  f"the others are not known to be stored. {resume()}".rstrip(". "), file=sys.stderr)
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
    again = f"; {duplicates} of them stored before (sent again, acked as duplicates)" if duplicates else ""
    print(f"{acked} images acked, {refused} refused, {len(unreadable)} unreadable, {elapsed:.1f} s "
          f"({acked / max(elapsed, 1e-9):.0f} images/s){again}")
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
