"""The durable labeled spool: append-only segment files of checksummed records.

One segment per experience (``spool/labeled-000007.log`` holds the labeled
samples of experience 7, while it is open and after it is cut). A message's
record is appended with ``append`` and becomes durable with ``commit`` (one
fdatasync for every record appended since the last commit: group commit); the
caller acks only after ``commit`` returned. A torn or corrupt tail (a crash in
the middle of a write) is cut off when the segment is reopened.

Record layout (little endian):
    b"CLR1" | u32 meta_len | u64 body_len | u32 crc32(meta + body) | meta JSON | body
meta: {"sender", "seq", "encoding", "shapes", "labels" (class ids), "sizes", "color", "ts"}; body: the payloads, concatenated.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from cl_agent.errors import BusyError
from cl_agent.keyset import KeySet
from cl_agent.storage import fsync_dir

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


def read_records(path: str | Path) -> Iterator[tuple[int, Record]]:
    """Yield (end offset, record) for every intact record; stops at the first torn or corrupt one."""
    with open(path, "rb") as f:
        data = f.read()
    offset = 0
    while offset + _HEAD.size <= len(data):
        magic, meta_len, body_len, crc = _HEAD.unpack_from(data, offset)
        start = offset + _HEAD.size
        end = start + meta_len + body_len
        if magic != MAGIC or end > len(data):
            return
        view = memoryview(data)
        meta_bytes, body = view[start : start + meta_len], view[start + meta_len : end]
        if zlib.crc32(body, zlib.crc32(meta_bytes)) != crc:
            return
        meta = json.loads(bytes(meta_bytes))
        payloads, pos = [], 0
        for size in meta["sizes"]:
            payloads.append(bytes(body[pos : pos + size]))
            pos += size
        shapes = [tuple(s) for s in meta["shapes"]]
        yield end, Record(
            meta["sender"], meta["seq"], meta["encoding"], shapes, meta["labels"], payloads, meta.get("color", "rgb"), meta.get("ts", 0.0)
        )
        offset = end


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
                with open(path, "r+b") as f:
                    f.truncate(good)
                    f.flush()
                    os.fsync(f.fileno())
        self._file = open(path, "ab", buffering=0)
        fsync_dir(self.directory)
        self.segment = index
        self.committed_offset = good  # bytes durable in the open segment
        self.offset = good  # bytes written (committed or not)
        self._pending: list[tuple[str, int]] = []

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
        """Write a record (not yet durable). Raises SpoolFull past max_bytes, OSError on a write failure."""
        data = record.to_bytes()
        if len(data) > self.max_bytes:
            raise RecordTooLarge(f"the message takes {len(data)} bytes in the spool, more than all of spool.max_bytes ({self.max_bytes})")
        if self.size_bytes + len(data) > self.max_bytes:
            raise SpoolFull(f"spool holds {self.size_bytes} bytes; {len(data)} more would pass max_bytes {self.max_bytes}")
        try:
            written = self._file.write(data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"short write: {written} of {len(data)} bytes")
        except OSError:
            self.rollback()
            raise
        self.offset += len(data)
        self._pending.append((record.sender, record.seq))
        self.segment_classes.update(record.labels)
        self.records += 1
        self.samples += len(record.payloads)
        if self.first_ts is None:
            self.first_ts = time.time()

    def commit(self) -> int:
        """Make every appended record durable (one fdatasync); returns how many became durable.

        On OSError the uncommitted records are removed from the file and counts, and the error is raised:
        the caller nacks them.
        """
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
        self._pending = []
        self.committed_offset = self.offset
        return count

    def rollback(self) -> None:
        """Drop records appended since the last commit (after a failed write or fsync)."""
        self._file.truncate(self.committed_offset)
        self.offset = self.committed_offset
        # Counts are rebuilt from the durable prefix so they match the file again.
        self.records, self.samples, self._pending = 0, 0, []
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
