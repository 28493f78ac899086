"""The durable labeled spool: append-only segment files of checksummed records.

One segment per experience (``spool/labeled-000007.log`` holds the labeled
samples of experience 7, while it is open and after it is cut). A message's
record is appended with ``append`` and becomes durable with ``commit`` (one
fdatasync for every record appended since the last commit: group commit); the
caller acks only after ``commit`` returned. A failed append removes only its own
bytes: the records appended before it in the group stay and are committed with it.
A torn or corrupt tail (a crash in the middle of a write) is cut off when the
segment is reopened; intact records after a damaged one (a flipped byte on disk)
are kept: the bytes from the damage on are set aside in ``<segment>.corrupt-<n>``
and the intact records found in them are written back to the segment.

Record layout (little endian):
    b"CLR1" | u32 meta_len | u64 body_len | u32 crc32(meta + body) | meta JSON | body
meta: {"sender", "seq", "encoding", "shapes", "labels" (class ids), "sizes", "color", "ts"}; body: the payloads, concatenated.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from cl_agent.errors import BusyError, CLAgentError
from cl_agent.keyset import KeySet
from cl_agent.storage import atomic_write_bytes, fsync_dir

log = logging.getLogger(__name__)

MAGIC = b"CLR1"
_HEAD = struct.Struct("<4sIQI")
# errno values that mean "the disk cannot take this": nack with reason disk_full.
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


@dataclass
class Record:
    """One labeled message as stored: still-encoded payloads and their class ids."""

    sender: str
    seq: int
    encoding: str
    shapes: list[tuple[int, int, int]]
    labels: list[int]
    payloads: list[bytes]
    color: str = "rgb"
    ts: float = 0.0

    def to_bytes(self) -> bytes:
        meta = {
            "sender": self.sender,
            "seq": self.seq,
            "encoding": self.encoding,
            "shapes": [list(s) for s in self.shapes],
            "labels": self.labels,
            "sizes": [len(p) for p in self.payloads],
            "color": self.color,
            "ts": self.ts,
        }
        meta_bytes = json.dumps(meta, separators=(",", ":")).encode()
        body = b"".join(self.payloads)
        crc = zlib.crc32(body, zlib.crc32(meta_bytes))
        return b"".join((_HEAD.pack(MAGIC, len(meta_bytes), len(body), crc), meta_bytes, body))


def segment_name(index: int) -> str:
    """The spool file of experience ``index``'s labeled records (what its meta.json names as labeled_segment)."""
    return f"labeled-{index:06d}.log"


def _record_at(data: bytes, offset: int) -> tuple[int, Record] | None:
    """(end offset, record) of the intact record starting at ``offset``; None if torn or corrupt there."""
    if offset + _HEAD.size > len(data):
        return None
    magic, meta_len, body_len, crc = _HEAD.unpack_from(data, offset)
    start = offset + _HEAD.size
    end = start + meta_len + body_len
    if magic != MAGIC or end > len(data):
        return None
    view = memoryview(data)
    meta_bytes, body = view[start : start + meta_len], view[start + meta_len : end]
    if zlib.crc32(body, zlib.crc32(meta_bytes)) != crc:
        return None
    try:
        meta = json.loads(bytes(meta_bytes))
        payloads, pos = [], 0
        for size in meta["sizes"]:
            payloads.append(bytes(body[pos : pos + size]))
            pos += size
        shapes = [tuple(s) for s in meta["shapes"]]
        record = Record(
            meta["sender"], meta["seq"], meta["encoding"], shapes, meta["labels"], payloads, meta.get("color", "rgb"), meta.get("ts", 0.0)
        )
    except (ValueError, KeyError, TypeError):
        return None
    return end, record


def read_records(path: str | Path) -> Iterator[tuple[int, Record]]:
    """Yield (end offset, record) for every intact record; stops at the first torn or corrupt one."""
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while (found := _record_at(data, offset)) is not None:
        yield found
        offset = found[0]


def intact_after(data: bytes, offset: int) -> list[tuple[int, int, Record]]:
    """(start, end, record) of the intact records found past a damaged one at ``offset``: the damage may
    have hit a length field, so each is found by its magic and checksum."""
    found = []
    pos = data.find(MAGIC, offset + 1)
    if offset + _HEAD.size <= len(data):
        magic, meta_len, body_len, _ = _HEAD.unpack_from(data, offset)
        declared_end = offset + _HEAD.size + meta_len + body_len
        if magic == MAGIC and _record_at(data, declared_end) is not None:
            pos = declared_end  # the damage left the lengths intact: the damaged body is not searched
    while pos != -1:
        record = _record_at(data, pos)
        if record is None:
            pos = data.find(MAGIC, pos + 1)
        else:
            found.append((pos, record[0], record[1]))
            pos = data.find(MAGIC, record[0])
    return found


class SpoolFull(Exception):
    """The spool's size limit would be passed: nack with reason spool_full."""


class RecordTooLarge(SpoolFull):
    """One record larger than the whole spool limit: no amount of training frees room for it."""


class Spool:
    """Appends records to the open segment; tracks committed (sender, seq) keys for idempotency.

    Not thread-safe: one ingest thread owns it.
    """

    def __init__(self, directory: str | Path, segment: int, max_bytes: int, *, closed_bytes: int = 0, keys: Iterable[tuple[str, int]] | None = None):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # One writer per spool: a second process would interleave records. The lock dies with the process.
        self._lock = open(self.directory / ".lock", "a+")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise BusyError(f"the spool {self.directory} is in use by another ingest process") from None
        self.max_bytes = max_bytes
        self.closed_bytes = closed_bytes  # bytes of cut, not yet trained segments (count against max_bytes)
        self.keys = keys if isinstance(keys, KeySet) else KeySet(keys or ())  # committed (sender, seq): also earlier segments
        self.segment = -1
        self._file = None
        self.open_segment(segment)

    # ---------------------------------------------------------------- segments

    def segment_path(self, index: int) -> Path:
        return self.directory / segment_name(index)

    def open_segment(self, index: int) -> None:
        """Open (or reopen after a crash) the segment of experience ``index``, cutting a torn tail."""
        if self._file is not None:
            self._file.close()
        path = self.segment_path(index)
        self.records = 0  # records in the open segment
        self.samples = 0  # labeled samples in the open segment
        self.first_ts: float | None = None  # arrival time of the open segment's first sample
        self.segment_keys: list[tuple[str, int]] = []
        self.segment_classes: set[int] = set()  # class ids seen in the open segment (may include rolled-back ones)
        good = 0
        if path.exists():
            for good, record in read_records(path):
                self._count(record)
            if good != path.stat().st_size:
                good = self._repair(path, good)
        self._file = open(path, "ab", buffering=0)
        fsync_dir(self.directory)
        self.segment = index
        self.committed_offset = good  # bytes durable in the open segment
        self.offset = good  # bytes written (committed or not)
        self._pending: list[tuple[str, int]] = []  # keys appended since the last commit, in order
        self._starts: list[int] = []  # the offset each pending record starts at
        self._images: list[int] = []  # the samples of each pending record
        self._lost: OSError | None = None  # pending records were lost (a failed removal): the next commit raises it

    def _repair(self, path: Path, good: int) -> int:
        """Cut the segment's damaged tail at ``good``, the end of its intact prefix; returns the new size.

        A torn last write (a crash) has nothing intact after it and is simply cut. Intact records after the
        damage (a flipped byte on disk; they were acked) are not dropped: every byte from ``good`` on is first
        set aside in ``<segment>.corrupt-<n>``, then those records are written back after the prefix. If the
        bytes cannot be set aside, the spool refuses to open (nothing is cut)."""
        data = path.read_bytes()
        salvaged = [(start, end, record) for start, end, record in intact_after(data, good) if (record.sender, record.seq) not in self.keys]
        if salvaged:
            n = 1
            while path.with_name(f"{path.name}.corrupt-{n}").exists():
                n += 1
            aside = path.with_name(f"{path.name}.corrupt-{n}")
            try:
                atomic_write_bytes(aside, data[good:])
            except OSError as e:
                raise CLAgentError(
                    f"{path} is damaged at byte {good} and {len(salvaged)} intact records follow, but the damaged part "
                    f"cannot be set aside in {aside}: {e}. Free disk space and start again (nothing was cut)"
                ) from None
        with open(path, "r+b") as f:
            f.truncate(good)
            for start, end, record in salvaged:
                f.seek(0, os.SEEK_END)
                f.write(data[start:end])
                self._count(record)
            f.flush()
            os.fsync(f.fileno())
        if salvaged:
            kept = sum(end - start for start, end, _ in salvaged)
            log.error(
                "%s: damaged record at byte %d (of %d); %d intact records after it (%d bytes) were kept and %d bytes that "
                "could not be read were dropped from the segment; all %d bytes from the damage on are kept in %s",
                path, good, len(data), len(salvaged), kept, len(data) - good - kept, len(data) - good, aside,
            )
            return good + kept
        return good

    def _count(self, record: Record) -> None:
        key = (record.sender, record.seq)
        self.keys.add(key)
        self.segment_keys.append(key)
        self.segment_classes.update(record.labels)
        self.records += 1
        self.samples += len(record.payloads)
        if self.first_ts is None:
            # the arrival time stored in the record, so a restart does not restart the time cut's clock
            self.first_ts = record.ts if record.ts > 0 else time.time()

    @property
    def size_bytes(self) -> int:
        return self.closed_bytes + self.offset

    # ---------------------------------------------------------------- writing

    def contains(self, sender: str, seq: int) -> bool:
        """True if (sender, seq) is committed or appended in the current group."""
        return (sender, seq) in self.keys or (sender, seq) in self._pending

    def append(self, record: Record) -> None:
        """Write a record (not yet durable). Raises SpoolFull past max_bytes, OSError on a write failure.

        A failed write removes only this record's bytes: the records appended before it stay pending."""
        data = record.to_bytes()
        if len(data) > self.max_bytes:
            raise RecordTooLarge(f"the message takes {len(data)} bytes in the spool, more than all of spool.max_bytes ({self.max_bytes})")
        if self.size_bytes + len(data) > self.max_bytes:
            raise SpoolFull(f"spool holds {self.size_bytes} bytes; {len(data)} more would pass max_bytes {self.max_bytes}")
        try:
            written = self._file.write(data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write: {written} of {len(data)} bytes")
        except OSError as e:
            self._remove_from(self.offset, e)
            raise
        self._starts.append(self.offset)
        self._images.append(len(record.payloads))
        self.offset += len(data)
        self._pending.append((record.sender, record.seq))
        self.segment_classes.update(record.labels)
        self.records += 1
        self.samples += len(record.payloads)
        if self.first_ts is None:
            self.first_ts = time.time()

    def drop_last(self) -> None:
        """Remove the record appended last (still pending), e.g. when what it depends on could not be saved."""
        start = self._starts.pop()
        self._pending.pop()
        self.records -= 1
        self.samples -= self._images.pop()
        if not self.records:
            self.first_ts = None
        self._remove_from(start, None)

    def _remove_from(self, offset: int, error: OSError | None) -> None:
        """Cut the file back to ``offset`` (the end of the records still pending). If that fails, every pending
        record is rolled back and the next ``commit`` raises, so none of them is acked."""
        try:
            self._file.truncate(offset)
            self.offset = offset
        except OSError as e:
            log.error("cannot cut the spool segment back to byte %d (%s): dropping the whole group", offset, e)
            self._lost = error or e
            self.rollback()

    def commit(self) -> int:
        """Make every appended record durable (one fdatasync); returns how many became durable.

        On OSError the uncommitted records are removed from the file and counts, and the error is raised:
        the caller nacks them. It is raised too when pending records were lost since the last commit.
        """
        if self._lost is not None:
            error, self._lost = self._lost, None
            self.rollback()
            raise error
        if not self._pending:
            return 0
        try:
            os.fdatasync(self._file.fileno()) if hasattr(os, "fdatasync") else os.fsync(self._file.fileno())
        except OSError:
            self.rollback()
            raise
        count = len(self._pending)
        self.keys.update(self._pending)
        self.segment_keys.extend(self._pending)
        self._pending, self._starts, self._images = [], [], []
        self.committed_offset = self.offset
        return count

    def rollback(self) -> None:
        """Drop records appended since the last commit (after a failed write or fsync)."""
        self._file.truncate(self.committed_offset)
        self.offset = self.committed_offset
        self._pending, self._starts, self._images = [], [], []
        # Counts are rebuilt from the durable prefix so they match the file again.
        self.records, self.samples = 0, 0
        first_ts, keys = self.first_ts, self.segment_keys
        self.segment_keys = []
        for _, record in read_records(self.segment_path(self.segment)):
            self.records += 1
            self.samples += len(record.payloads)
        self.segment_keys = keys
        self.first_ts = first_ts if self.records else None

    def cut(self) -> tuple[int, list[tuple[str, int]], int]:
        """Close the open segment (already durable) and open the next: returns (index, keys, bytes) of the closed one."""
        if self._pending:
            raise RuntimeError("commit before cutting a segment")
        index, keys, size = self.segment, self.segment_keys, self.offset
        self.closed_bytes += size
        self.open_segment(index + 1)
        return index, keys, size

    def close(self) -> None:
        if self._file is not None:
            if self._pending:
                self.rollback()
            self._file.close()
            self._file = None
        if not self._lock.closed:
            self._lock.close()  # releases the flock
