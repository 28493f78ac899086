"""Labeled intake: a group of labeled messages in, durable spool records and one answer per message out.

No sockets here: the ingestion service hands over the message bodies it
drained and sends back what this returns. The whole group shares one commit
(one fsync), and every answer is decided only after that commit:

    validate -> duplicate? -> decode every image -> plan class ids -> spool.append -> save new class names
    ... spool.commit -> ack | nack

INVARIANT: an ack is produced only for a record whose commit returned.
INVARIANT: a refused message adds no class name; an acked one's names were saved before its ack. A failed
write removes only its own record (the others of the group stay and are answered after the commit). A group
whose commit fails keeps the class names its messages added: a trainer may already have published a
version naming them, and a map shorter than a published version is refused at start.
INVARIANT: an acked image decodes, within the size limits the trainer decodes it under (``ingest.wire``, the
same as here): a message with one that does not is refused whole (``decode_failed`` or ``image_too_large``,
the nack naming the image) before any class is added.
The stored bytes are the ones received; the decoded pixels are discarded.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from cl_agent.codec import check_decodes
from cl_agent.config import WireSection
from cl_agent.labels import LabelError, LabelMap
from cl_agent.spool import DISK_FULL_ERRNOS, Record, RecordTooLarge, Spool, SpoolFull
from cl_agent.wire import Message, WireError, decode_message, peek_seq, reply

log = logging.getLogger(__name__)

AGENT_SENDER = "agent"


class Counters:
    """Named counts plus refusals per reason; updated by the ingest thread, read from any thread."""

    def __init__(self, names: Iterable[str]):
        self._counts = dict.fromkeys(names, 0)
        self._rejected: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] += n

    def add_many(self, counts: dict[str, int]) -> None:
        with self._lock:
            for name, n in counts.items():
                self._counts[name] += n

    def reject(self, reason: str) -> None:
        with self._lock:
            self._rejected[reason] += 1

    def snapshot(self) -> dict:
        with self._lock:
            out = dict(self._counts)
            out["rejected"] = dict(self._rejected)
        return out


@dataclass
class EndRequest:
    """An end_experience message met in the group: the service cuts and answers it after the commit."""

    seq: int


Answer = Callable[[OSError | None], list[bytes]]  # the reply, once the commit's outcome is known


PARALLEL_CHECK_BYTES = 256 * 1024  # a message this large is checked on several threads (cv2 drops the GIL)


def check_trainable(message: Message, pool: Executor | None = None) -> None:
    """Every image of a validated message decodes in full.

    ``decode_message`` checked the sizes, read from the header bytes, against ``ingest.wire`` (the limits
    the trainer decodes stored images under too); a truncated or corrupt body passes it. WireError names
    the first image refused (``image`` is its index). With ``pool``, a message of several images and at
    least PARALLEL_CHECK_BYTES is checked on its threads: a large batch holds the ingest loop (and the
    frames behind it) for a fraction of the time; the answer is the same.
    """
    def check(i: int) -> None:
        try:
            check_decodes(message.payloads[i], message.encoding)
        except WireError as e:
            raise WireError(e.reason, f"image {i}: {e.detail}", image=i) from None

    indices = range(len(message.payloads))
    parallel = pool is not None and message.encoding != "raw" and len(indices) > 1 \
        and sum(len(p) for p in message.payloads) >= PARALLEL_CHECK_BYTES
    for _ in (pool.map(check, indices) if parallel else map(check, indices)):
        pass  # map yields in order, so the first failure raised is the lowest image index


def _disk_reason(error: OSError) -> str:
    return "disk_full" if error.errno in DISK_FULL_ERRNOS else "spool_error"


class LabeledIntake:
    def __init__(
        self,
        spool: Spool,
        labels: LabelMap,
        wire: WireSection,
        counters: Counters,
        untrained_bytes: Callable[[], int],
    ):
        self.spool = spool
        self.labels = labels
        self.wire = wire
        self.counters = counters
        self.untrained_bytes = untrained_bytes  # recount of cut, untrained spool bytes (a trainer may have freed some)
        self.refused_full = False  # a message was refused spool_full since the service last looked
        self._pool: ThreadPoolExecutor | None = None  # decode checks of large messages; made on first use

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def _check_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            workers = max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))
            self._pool = ThreadPoolExecutor(workers, thread_name_prefix="decode-check")
        return self._pool

    def process(self, bodies: Sequence[list[bytes]]) -> list[list[bytes] | EndRequest]:
        """Store a group of labeled messages with one commit; one reply (or EndRequest) per body, in order."""
        pending: list[Answer | EndRequest] = []
        appended: list[int] = []  # images per appended record
        for body in bodies:
            self.counters.add("labeled_messages")
            try:
                message = decode_message(body, self.wire)
            except WireError as e:
                pending.append(self._nack(peek_seq(body, self.wire), e.reason, e.detail, e.image))
                continue
            if message.kind == "end_experience":
                pending.append(EndRequest(message.seq))
            elif message.kind != "labeled":
                pending.append(self._nack(message.seq, "unexpected_kind", f"kind {message.kind!r} on the labeled socket"))
            else:
                pending.append(self._store(message, appended))
        error: OSError | None = None
        try:
            if self.spool.commit():
                self.counters.add("commits")
        except OSError as e:
            error = e
            log.error("spool commit failed, nacking %d messages: %s", len(appended), e)
        if error is None:
            self.counters.add("labeled_images_acked", sum(appended))
        return [item if isinstance(item, EndRequest) else item(error) for item in pending]

    def _nack(self, seq: int, reason: str, detail: str, image: int | None = None) -> Answer:
        self.counters.reject(reason)
        self.counters.add("labeled_nacked")
        fields = {} if image is None else {"image": image}  # the index of the image refused
        return lambda _error: reply("nack", AGENT_SENDER, seq, reason=reason, detail=detail, **fields)

    def _store(self, message: Message, appended: list[int]) -> Answer:
        """Append one message (not yet durable); the answer waits for the commit."""
        seq = message.seq
        if self.spool.contains(message.sender, seq):
            self.counters.add("labeled_duplicates")
            return self._after_commit(seq, 0, duplicate=True)
        try:
            check_trainable(message, self._check_pool())
        except WireError as e:
            return self._nack(seq, e.reason, e.detail, e.image)
        try:
            plan = self.labels.plan(message.labels)
        except LabelError as e:
            return self._nack(seq, e.reason, e.detail)
        record = Record(message.sender, seq, message.encoding, message.shapes, plan.ids, message.payloads, message.color, time.time())
        try:
            try:
                self.spool.append(record)
            except RecordTooLarge as e:  # not spool_full: a sender retrying it would wait for ever
                return self._nack(seq, "message_too_large", str(e))
            except SpoolFull:
                self.spool.closed_bytes = self.untrained_bytes()
                self.spool.append(record)
        except SpoolFull as e:
            self.refused_full = True
            return self._nack(seq, "spool_full", str(e))
        except OSError as e:
            return self._nack(seq, _disk_reason(e), str(e))
        try:
            self.labels.apply(plan)  # new class names: saved before the commit, so before any ack using them
        except OSError as e:
            self.spool.drop_last()
            log.error("cannot save the class names to %s, refusing message %s/%d: %s", self.labels.path, message.sender, seq, e)
            return self._nack(seq, _disk_reason(e), f"cannot save the class names to labels.json: {e}")
        appended.append(len(message.payloads))
        return self._after_commit(seq, len(message.payloads), duplicate=False)

    def _after_commit(self, seq: int, images: int, *, duplicate: bool) -> Answer:
        def answer(error: OSError | None) -> list[bytes]:
            if error is not None:
                reason = _disk_reason(error)
                self.counters.reject(reason)
                self.counters.add("labeled_nacked")
                return reply("nack", AGENT_SENDER, seq, reason=reason, detail=str(error))
            self.counters.add("labeled_acked")
            return reply("ack", AGENT_SENDER, seq, accepted=images, duplicate=duplicate, experience=self.spool.segment)

        return answer
