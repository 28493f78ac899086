"""Frame senders as seen through their seqs: frames lost in between, and one sender id used by two streams.

A camera numbers its frames 0, 1, 2, ... (``FrameClient``), dropped ones included, so a
gap in one sender's seqs is frames lost on the way. A seq that is not above the previous
one is a restarted camera (once), or two streams sharing a sender id: their frames
interleave, the seqs go back at nearly every other frame, and every jump forward would
be counted as lost frames. So a sender whose seqs go back ``CLASH_STEPS`` times within
``CLASH_WINDOW_S`` is taken for a shared id: a warning names it (at most once every
``WARN_EVERY_S`` per sender), the caller counts the detection, and its gaps are not
counted as drops until its seqs have stopped going back for ``CLASH_WINDOW_S``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Callable

log = logging.getLogger(__name__)

MAX_TRACKED_SENDERS = 10_000  # senders whose last seq is remembered (to count drops)
CLASH_STEPS = 3  # seqs going back this often within CLASH_WINDOW_S: two streams share the id (a restart is one)
CLASH_WINDOW_S = 10.0
WARN_EVERY_S = 60.0  # at most one warning (and one counted clash) per sender this often


class _Sender:
    __slots__ = ("last", "back_at", "warned_at")

    def __init__(self, seq: int):
        self.last = seq
        self.back_at: deque[float] = deque(maxlen=CLASH_STEPS)  # times of the latest steps back
        self.warned_at: float | None = None


class FrameSenders:
    """Per sender id: the last seq seen, and when its seqs last went back. Owned by one thread."""

    def __init__(self, max_senders: int = MAX_TRACKED_SENDERS, clock: Callable[[], float] = time.monotonic):
        self.max_senders = max_senders
        self.clock = clock
        self._senders: dict[str, _Sender] = {}

    def observe(self, sender: str, seq: int) -> tuple[int, bool]:
        """Take one frame's seq; returns (frames lost just before it, whether a shared sender id was detected now)."""
        state = self._senders.get(sender)
        if state is None:
            if len(self._senders) >= self.max_senders:
                self._senders.clear()  # bounded memory; at worst one gap per sender goes uncounted
            self._senders[sender] = _Sender(seq)
            return 0, False
        last, state.last = state.last, seq
        if seq > last:
            if seq == last + 1 or self._clashing(state, self.clock()):
                return 0, False
            return seq - last - 1, False
        now = self.clock()
        state.back_at.append(now)
        if not self._clashing(state, now):
            return 0, False
        if state.warned_at is not None and now - state.warned_at < WARN_EVERY_S:
            return 0, False
        state.warned_at = now
        log.warning(
            "frame sender %r: its seqs went back %d times within %.0f s (now %d after %d): two streams probably "
            "share this sender id; give each camera its own (stream_camera.py --sender). Its gaps are not "
            "counted as dropped frames meanwhile",
            sender, len(state.back_at), CLASH_WINDOW_S, seq, last,
            extra={"sender": sender},
        )
        return 0, True

    @staticmethod
    def _clashing(state: _Sender, now: float) -> bool:
        back = state.back_at
        return len(back) == CLASH_STEPS and now - back[0] <= CLASH_WINDOW_S
