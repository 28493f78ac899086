"""A bounded reservoir of encoded frames (reservoir sampling over the stream).

Frames stay encoded (JPEG/PNG/raw bytes); they are decoded only when an
experience that drew them is trained on. With ``per_source`` each sender gets
its own reservoir and the capacity is split evenly among the sources seen so
far, so a chatty camera cannot crowd out a quiet one.

INVARIANT: the number of frames held never exceeds ``capacity``.

``save``/``restore`` carry the frames and the sampling bookkeeping across a
restart: one ``.npz`` file (no pickle) with the payloads concatenated and a
JSON index of the pools and frames.
"""

from __future__ import annotations

import json
import logging
import os
import random
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cl_agent.storage import atomic_write

log = logging.getLogger(__name__)


OVERFLOW_SOURCE = "\x00other"  # the shared pool of senders past max_sources
SAVED_FORMAT = 1  # version of the saved-reservoir index
SAVED_FILE = "reservoir.npz"  # in the working directory: the frames held at the last clean stop


class Frame(NamedTuple):
    """One encoded frame: payload bytes plus what is needed to decode them (a tuple: cheap at 10k frames/s)."""

    payload: bytes
    encoding: str
    shape: tuple[int, int, int]
    color: str = "rgb"
    source: str = ""


class _Pool:
    """Algorithm R over one stream: every frame seen so far is held with equal probability."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items: list[Frame] = []
        self.seen = 0

    def add(self, frame: Frame, rng: random.Random) -> tuple[bool, Frame | None]:
        """Returns (kept, the frame it replaced)."""
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(frame)
            return True, None
        j = rng.randrange(self.seen)
        if j < self.capacity:
            old, self.items[j] = self.items[j], frame
            return True, old
        return False, None

    def shrink(self, capacity: int, rng: random.Random) -> None:
        # A uniform random subset of a uniform sample is still a uniform sample.
        self.capacity = capacity
        if len(self.items) > capacity:
            self.items = rng.sample(self.items, capacity)


class Reservoir:
    def __init__(self, capacity: int, per_source: bool = False, seed: int = 0, max_sources: int = 64):
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.per_source = per_source
        self.max_sources = max_sources  # senders past this many share one pool (names can be per-frame text)
        self._rng = random.Random(seed)
        self._pools: dict[str, _Pool] = {}
        self.seen = 0
        self.nbytes = 0

    def __len__(self) -> int:
        # list() copies the pools atomically, so another thread (metrics) may call this while frames arrive.
        return sum(len(p.items) for p in list(self._pools.values()))

    def _pool(self, source: str) -> _Pool:
        key = source if self.per_source else ""
        pool = self._pools.get(key)
        if pool is None and len(self._pools) >= self.max_sources:
            key = OVERFLOW_SOURCE
            pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self.capacity)
            if self.per_source:
                # Even split; the remainder goes to the oldest sources (more sources than slots: the newest get none).
                base, extra = divmod(self.capacity, len(self._pools))
                for i, other in enumerate(self._pools.values()):
                    other.shrink(base + (1 if i < extra else 0), self._rng)
                self._recount()
        return pool

    def _recount(self) -> None:
        self.nbytes = sum(len(f.payload) for p in self._pools.values() for f in p.items)

    def add(self, frame: Frame) -> bool:
        """Offer one frame; returns True if it was kept (possibly replacing another)."""
        pool = self._pool(frame.source)
        self.seen += 1
        if pool.capacity == 0:
            pool.seen += 1
            return False
        kept, old = pool.add(frame, self._rng)
        if kept:
            self.nbytes += len(frame.payload) - (len(old.payload) if old is not None else 0)
        return kept

    def sample(self, k: int) -> list[Frame]:
        """Up to ``k`` distinct frames drawn uniformly from everything held."""
        items = [f for p in self._pools.values() for f in p.items]
        return self._rng.sample(items, min(k, len(items)))

    def sources(self) -> dict[str, int]:
        return {name: len(p.items) for name, p in list(self._pools.items())}

    # ------------------------------------------------------------------ across restarts

    def save(self, path: str | os.PathLike) -> Path:
        """Write every frame held, with the pools' capacities and counts, to ``path`` atomically.

        The payloads are streamed into the archive one frame at a time (never joined in memory),
        so saving takes a small constant of extra memory, not a copy of the reservoir.
        Call it only while nothing adds frames (after the ingest loop stopped). Raises OSError."""
        pools, held, offset = [], [], 0
        for key, pool in list(self._pools.items()):
            frames = []
            for frame in pool.items:
                size = len(frame.payload)
                frames.append([offset, size, frame.encoding, list(frame.shape), frame.color, frame.source])
                held.append(frame.payload)
                offset += size
            pools.append({"key": key, "capacity": pool.capacity, "seen": pool.seen, "frames": frames})
        index = {
            "format": SAVED_FORMAT, "capacity": self.capacity, "per_source": self.per_source,
            "max_sources": self.max_sources, "seen": self.seen, "pools": pools,
        }
        return _write_saved(Path(path), json.dumps(index).encode("utf-8"), held, offset)

    def restore(self, path: str | os.PathLike) -> int:
        """Take the frames saved at ``path`` (see ``save``) into this empty reservoir; returns how many it holds.

        No file: 0. A damaged file is logged and ignored (the reservoir stays empty), never raised.
        Saved with the same capacity and per-source settings, the pools come back exactly (sampling
        goes on as if there had been no restart); otherwise the frames are offered again one by one."""
        path = Path(path)
        if not path.exists():
            return 0
        try:
            index, frames_by_pool = _read_saved(path)
            same = (index["capacity"], index["per_source"], index["max_sources"]) == (self.capacity, self.per_source, self.max_sources)
            if same:
                self._pools = {}
                for pool, frames in frames_by_pool:
                    restored = self._pools[str(pool["key"])] = _Pool(int(pool["capacity"]))
                    restored.items, restored.seen = frames, int(pool["seen"])
                if len(self) > self.capacity or any(len(p.items) > p.capacity for p in self._pools.values()):
                    raise ValueError("more frames than the saved capacities allow")
                self.seen = int(index["seen"])
            else:
                log.info("reservoir settings changed since %s was saved: its frames are offered again", path)
                for _, frames in frames_by_pool:
                    for frame in frames:
                        self.add(frame)
        except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, zipfile.BadZipFile, zlib.error) as e:
            log.warning("ignoring the saved frame reservoir %s (unreadable: %s: %s); starting with no unlabeled frames",
                        path, type(e).__name__, e)
            self._pools, self.seen = {}, 0
        self._recount()
        if len(self):
            log.info("restored %d unlabeled frames saved in %s at the last stop", len(self), path)
        return len(self)


def _write_saved(path: Path, index: bytes, payloads: list[bytes], total: int) -> Path:
    """An uncompressed ``.npz`` (what ``np.savez`` writes: ``index`` and ``payloads``, two 1-d uint8
    arrays) with the payloads written into the archive one by one; atomically, via a temporary
    file in the same directory and a rename."""

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, parts, size in (("index", [index], len(index)), ("payloads", payloads, total)):
                with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
                    np.lib.format.write_array_header_2_0(entry, {"descr": "|u1", "fortran_order": False, "shape": (size,)})
                    for part in parts:
                        entry.write(part)

    return atomic_write(path, write)


def _npy_length(entry) -> int:
    """The length of the 1-d uint8 array whose ``.npy`` header ``entry`` starts with; ValueError otherwise."""
    version = np.lib.format.read_magic(entry)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise ValueError(f"unsupported .npy version {version}")
    shape, _, dtype = read_header(entry)
    if dtype != np.uint8 or len(shape) != 1:
        raise ValueError(f"payloads: expected a 1-d uint8 array, got {dtype} {shape}")
    return int(shape[0])


def _read_saved(path: Path) -> tuple[dict, list[tuple[dict, list[Frame]]]]:
    """The JSON index and each saved pool with its frames; ValueError if ``path`` is not a saved reservoir.

    Nothing is unpickled. The payloads are read frame by frame from the archive (never as one
    array), so restoring takes little more memory than the frames it restores."""
    with zipfile.ZipFile(path) as archive:
        with archive.open("index.npy") as entry:
            index = json.loads(np.lib.format.read_array(entry, allow_pickle=False).tobytes().decode("utf-8"))
        if not isinstance(index, dict) or index.get("format") != SAVED_FORMAT:
            raise ValueError(f"not a saved reservoir of format {SAVED_FORMAT}")
        with archive.open("payloads.npy") as entry:
            total = _npy_length(entry)
            start = entry.tell()
            frames_by_pool = []
            for pool in index["pools"]:
                frames = []
                for offset, size, encoding, shape, color, source in pool["frames"]:
                    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (offset, size, *shape)):
                        raise ValueError(f"frame offset {offset!r}, size {size!r}, shape {shape!r}: expected integers")
                    if not (0 <= offset and 0 <= size and offset + size <= total):
                        raise ValueError(f"frame bytes {offset}..{offset + size} outside the {total} saved")
                    if len(shape) != 3 or min(shape) < 1 or not all(isinstance(v, str) for v in (encoding, color, source)):
                        raise ValueError(f"frame shape {shape!r}, encoding {encoding!r}, color {color!r}: not a frame's")
                    if start + offset < entry.tell():  # saved in order, each byte once: one pass over the file
                        raise ValueError(f"frame bytes {offset}..{offset + size} overlap or precede a frame read before")
                    if entry.tell() != start + offset:
                        entry.seek(start + offset)  # forward: the archive reads the bytes in between
                    payload = entry.read(size)
                    if len(payload) != size:
                        raise ValueError(f"frame bytes {offset}..{offset + size}: the file ends after {len(payload)}")
                    frames.append(Frame(payload, encoding, tuple(shape), color, source))
                frames_by_pool.append((pool, frames))
            while entry.read(1 << 20):  # to the end: the archive checks the CRC of all the bytes
                pass
    return index, frames_by_pool


def save_reservoir(reservoir: Reservoir, path: str | os.PathLike) -> bool:
    """``reservoir.save(path)``, logged: a failure to write loses only these frames, so it never raises."""
    try:
        reservoir.save(path)
    except OSError as e:
        log.warning("cannot save the %d reservoir frames to %s (%s); the next start has none", len(reservoir), path, e)
        return False
    log.info("saved %d reservoir frames to %s for the next start", len(reservoir), path)
    return True
