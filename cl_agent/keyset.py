"""KeySet: the (sender, seq) keys of stored labeled messages, held as runs of consecutive seqs.

The ingest process keeps the key of every labeled message it ever stored, so that a retried
message is recognised after any number of experiences and restarts (docs/protocol.md,
"Idempotent"). A set of tuples costs about 170 bytes per message, without bound for as long
as the agent runs. Senders number their messages consecutively (``LabeledClient`` adds one
per message), so the keys of one sender form a few runs ``[start, end]``: a new run per client
restart or per message it gave up on, not per message. Memory then grows with those events.

Membership and insertion are a binary search in the sender's runs; an insertion at the end
(the usual case) appends or extends the last run.
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Iterable, Iterator


class KeySet:
    """A set of (sender, seq) keys stored as sorted, disjoint runs of consecutive seqs per sender."""

    def __init__(self, keys: Iterable[tuple[str, int]] = ()):
        self._starts: dict[str, list[int]] = {}
        self._ends: dict[str, list[int]] = {}  # inclusive; _ends[s][i] + 1 < _starts[s][i + 1]
        self._count = 0
        self.update(keys)

    def __contains__(self, key: object) -> bool:
        sender, seq = key  # type: ignore[misc]
        starts = self._starts.get(sender)
        if not starts:
            return False
        i = bisect_right(starts, seq) - 1
        return i >= 0 and seq <= self._ends[sender][i]

    def add(self, key: tuple[str, int]) -> None:
        sender, seq = key
        starts = self._starts.setdefault(sender, [])
        ends = self._ends.setdefault(sender, [])
        i = bisect_right(starts, seq) - 1  # the run starting at or before seq, if any
        if i >= 0 and seq <= ends[i]:
            return
        joins_left = i >= 0 and ends[i] == seq - 1
        joins_right = i + 1 < len(starts) and starts[i + 1] == seq + 1
        if joins_left and joins_right:  # seq fills the gap between two runs
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = seq
        elif joins_right:
            starts[i + 1] = seq
        else:
            starts.insert(i + 1, seq)
            ends.insert(i + 1, seq)
        self._count += 1

    def update(self, keys: Iterable[tuple[str, int]]) -> None:
        for key in keys:
            self.add(key)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[tuple[str, int]]:
        for sender, starts in self._starts.items():
            for start, end in zip(starts, self._ends[sender]):
                for seq in range(start, end + 1):
                    yield sender, seq

    def runs(self) -> int:
        """How many runs are held (what the memory grows with)."""
        return sum(len(starts) for starts in self._starts.values())

    def to_runs(self) -> dict[str, list[list[int]]]:
        """The runs as plain JSON data: sender -> [[first seq, last seq], ...], in order."""
        return {sender: [[s, e] for s, e in zip(starts, self._ends[sender])] for sender, starts in self._starts.items()}

    @classmethod
    def from_runs(cls, runs: object) -> "KeySet":
        """The inverse of ``to_runs``; raises ValueError naming the first thing that is not sorted, disjoint runs."""
        if not isinstance(runs, dict):
            raise ValueError(f"runs must be an object of sender -> [[first, last], ...], got {type(runs).__name__}")
        keys = cls()
        for sender, pairs in runs.items():
            if not isinstance(pairs, list):
                raise ValueError(f"sender {sender!r}: runs must be a list, got {type(pairs).__name__}")
            starts, ends = [], []
            for pair in pairs:
                if not (isinstance(pair, list) and len(pair) == 2 and all(type(v) is int for v in pair) and pair[0] <= pair[1]):
                    raise ValueError(f"sender {sender!r}: {pair!r} is not a run [first, last] of integers")
                if ends and pair[0] <= ends[-1] + 1:
                    raise ValueError(f"sender {sender!r}: run {pair!r} is not after the one before it, with a gap")
                starts.append(pair[0])
                ends.append(pair[1])
                keys._count += pair[1] - pair[0] + 1
            if starts:
                keys._starts[sender], keys._ends[sender] = starts, ends
        return keys
