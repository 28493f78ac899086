"""A bounded reservoir of encoded frames (reservoir sampling over the stream).

Frames stay encoded (JPEG/PNG/raw bytes); they are decoded only when an
experience that drew them is trained on. With ``per_source`` each sender gets
its own reservoir and the capacity is split evenly among the sources seen so
far, so a chatty camera cannot crowd out a quiet one.

INVARIANT: the number of frames held never exceeds ``capacity``.
"""

from __future__ import annotations

import random
from typing import NamedTuple


OVERFLOW_SOURCE = "\x00other"  # the shared pool of senders past max_sources


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
