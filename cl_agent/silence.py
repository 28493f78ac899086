"""The agent's fetch endpoint, as a follower sees it: say when it goes silent, or fails the same way again and again, at a bounded rate.

The follower (``cl_agent/follower.py``) keeps one; its messages name the fetch endpoint.
A silence is measured from the start or the peer's last answer: warned about once it
reaches ``warn_s``, again every ``repeat_s`` while it lasts, and its end is said.
A failure is logged at once when it is new; the same failure again is logged at most
every ``repeat_s``, with the number of repeats left unlogged in between.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable


class SilenceWatch:
    """Silence and repeated-failure bookkeeping for one fetch endpoint; thread-safe for ``answered`` and ``check``."""

    def __init__(self, log: logging.Logger, endpoint: str, *, warn_s: float, repeat_s: float):
        self.log = log
        self.endpoint = endpoint
        self.warn_s = warn_s
        self.repeat_s = repeat_s
        self._lock = threading.Lock()
        self.last_answer = time.monotonic()  # the start counts as an answer: silence is measured from here
        self._warned_at: float | None = None  # when the current silence was last warned about
        self._last_failure: str | None = None  # the last failure's text, while failures go on
        self._failure_logged_at = 0.0  # when it was last logged
        self._failure_repeats = 0  # times it came again since then, unlogged

    def restart(self) -> None:
        """A new start: silence is measured from now."""
        with self._lock:
            self.last_answer, self._warned_at = time.monotonic(), None

    def answered(self) -> None:
        """The peer sent something back: the silence, if any, is over."""
        with self._lock:
            now = time.monotonic()
            silent_s, warned = now - self.last_answer, self._warned_at is not None
            self.last_answer, self._warned_at = now, None
        if warned:
            self.log.info("the agent's fetch endpoint %s answers again (after %.0f s without an answer)", self.endpoint, silent_s)

    def check(self, now: float, warning: Callable[[float], str]) -> bool:
        """Log ``warning(silent_s)`` if the peer has not answered for ``warn_s`` and the last warning is ``repeat_s`` old; True if it did."""
        with self._lock:
            silent_s = now - self.last_answer
            if silent_s < self.warn_s:
                return False
            if self._warned_at is not None and now - self._warned_at < self.repeat_s:
                return False
            self._warned_at = now
        self.log.warning("%s", warning(silent_s))
        return True

    def report_failure(self, error: Exception, delay: float, now: float) -> bool:
        """Log a failed attempt: a new error at once, the same error again at most every ``repeat_s``; True if logged."""
        text = str(error)
        if text == self._last_failure and now - self._failure_logged_at < self.repeat_s:
            self._failure_repeats += 1
            self.log.debug("fetch from %s failed again, retrying in %.1f s: %s", self.endpoint, delay, text)
            return False
        repeats = f" (the same error {self._failure_repeats} more times since it was last logged)" if (
            text == self._last_failure and self._failure_repeats) else ""
        self.log.warning("fetch from %s failed, retrying in %.1f s: %s%s", self.endpoint, delay, text, repeats)
        self._last_failure, self._failure_logged_at, self._failure_repeats = text, now, 0
        return True

    def succeeded(self) -> None:
        """An attempt worked: say so if failures were going on."""
        if self._last_failure is not None:
            self.log.info("fetch from %s works again", self.endpoint)
            self._last_failure, self._failure_repeats = None, 0
