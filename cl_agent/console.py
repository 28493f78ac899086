"""A live progress view of the agent for a terminal, without dependencies.

On a TTY a block of lines is redrawn in place with ANSI escape codes::

    experience 3  training  step 120/400  [######--------------]  30%  elapsed 2m10s  eta 5m03s
    loss    ce 0.5120  mlkd 0.1010  ssl 0.2200
    ingest  labeled 12.0/s  frame 30.1/s  backlog 1
    model   published v3  served v2  online accuracy 0.620

After training the head names the phase the trainer reports (``saving checkpoint``,
``exporting``, ``checking parity``, ``publishing``) with the steps done and how long
the phase has lasted and, once the update is done, ``idle (version N)``.
Elsewhere (a log file, a pipe, systemd) the same text becomes one line, printed when
it changed (at most every ``interval_s`` seconds) and repeated unchanged only every
``UNCHANGED_REPEAT`` intervals, as a sign of life. Log records written through
``log_stream()`` appear above the block instead of being overwritten by it.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from typing import TextIO

from cl_agent.config import MetricsSection
from cl_agent.status import TRAINING, duration_text

CURSOR_UP_LINES = "\x1b[{}F"  # to the start of the line n lines up
CLEAR_TO_END = "\x1b[J"  # erase from the cursor to the end of the screen
CLEAR_LINE = "\x1b[2K"
BAR_WIDTH = 20
MIN_RATE_WINDOW_S = 1.0  # ingest rates are computed over at least this long
UNCHANGED_REPEAT = 6  # non-TTY: an unchanged line is printed again only after this many intervals
IDLE = "idle"


def is_tty(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM") != "dumb"


def _flatten(values: Mapping, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


class LiveView:
    """Progress of the agent on ``stream``. ``update(fields)`` merges fields; ``close()`` prints the last state.

    Fields it shows (all optional): ``phase`` (one of ``cl_agent.status.PHASES``, or "idle"),
    ``experience``, ``step``, ``steps`` (ints), ``elapsed_s``, ``eta_s``, ``phase_elapsed_s``
    (seconds, see ``cl_agent.status.UpdateProgress``),
    ``losses`` ({term: float}), ``ingest`` (cumulative counts {name: number}, nested allowed;
    shown as rates), ``rates`` ({name: per-second float}, shown as given), ``backlog``,
    ``published_version``, ``served_version`` (ints), ``online_accuracy`` (float).
    Thread-safe.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        interval_s: float = 10.0,
        tty: bool | None = None,
        min_redraw_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.stream = stream
        self.tty = is_tty(stream) if tty is None else tty
        self.interval_s = interval_s  # non-TTY: seconds between lines
        self.min_redraw_s = min_redraw_s  # TTY: at most one redraw per this many seconds
        self.clock = clock
        self.fields: dict = {}
        self.rates: dict[str, float] = {}
        self._rate_base: tuple[float, dict[str, float]] | None = None
        self._drawn_lines = 0  # TTY: height of the block on screen now
        self._last_output = -float("inf")
        self._last_line: str | None = None  # non-TTY: the line printed last
        self._dirty = False
        self._closed = False
        self._lock = threading.RLock()

    @classmethod
    def from_section(cls, section: MetricsSection, stream: TextIO) -> LiveView | None:
        """The view the config asks for (None when ``metrics.console`` is false)."""
        return cls(stream, interval_s=section.console_interval_s) if section.console else None

    # ------------------------------------------------------------------ input

    def update(self, fields: Mapping) -> None:
        with self._lock:
            if self._closed:
                return
            now = self.clock()
            self.fields.update(fields)
            if "ingest" in fields:
                self._update_rates(now, _flatten(fields["ingest"]))
            self._dirty = True
            wait = self.min_redraw_s if self.tty else self.interval_s
            if now - self._last_output >= wait:
                self._output(now)

    def _update_rates(self, now: float, totals: dict[str, float]) -> None:
        if self._rate_base is None:
            self._rate_base = (now, totals)
            return
        then, previous = self._rate_base
        if now - then < MIN_RATE_WINDOW_S:
            return
        self.rates = {k: max(0.0, v - previous.get(k, 0.0)) / (now - then) for k, v in totals.items()}
        self._rate_base = (now, totals)

    def close(self) -> None:
        """Show the final state (if not shown yet) and stop drawing."""
        with self._lock:
            if self._closed:
                return
            if self._dirty:
                self._output(self.clock())
            self._closed = True
            self.stream.flush()

    # ------------------------------------------------------------------ text

    def lines(self) -> list[str]:
        """The view as text lines (no escape codes)."""
        f = self.fields
        head = self._head()

        losses = f.get("losses") or {}
        loss = "loss    " + ("  ".join(f"{k} {v:.4f}" for k, v in losses.items()) if losses else "-")

        rates = dict(f.get("rates") or {}) | self.rates
        ingest = "ingest  " + ("  ".join(f"{k} {v:.1f}/s" for k, v in rates.items()) if rates else "-")
        if f.get("backlog") is not None:
            ingest += f"  backlog {f['backlog']}"

        published, served = f.get("published_version"), f.get("served_version")
        if published is None and served is None:
            model = "model   none published yet"
        else:
            # served unknown: no hosted server, or it has not answered which version it serves yet
            model = "model   published " + ("none yet" if published is None else f"v{published}")
            model += "  served " + ("unknown" if served is None else f"v{served}")
        if f.get("online_accuracy") is not None:
            model += f"  online accuracy {f['online_accuracy']:.3f}"
        return [head, loss, ingest, model]

    def _head(self) -> str:
        f = self.fields
        phase, published = f.get("phase"), f.get("published_version")
        if phase == IDLE or (phase is None and published is not None):
            # between updates: nothing moves, so no bar (a full one looked like a stalled update)
            return "idle (" + ("no version published yet" if published is None else f"version {published}") + ")"
        if f.get("experience") is None:
            return "waiting for the first experience"
        head = f"experience {f['experience']}"
        if phase:
            head += f"  {phase}"
        step, steps = f.get("step"), f.get("steps")
        if phase and phase != TRAINING:  # after training: checkpoint, export, parity check, publish
            if step is not None:
                head += f"  after {step}/{steps} steps"
            if f.get("phase_elapsed_s") is not None:
                head += f"  for {duration_text(f['phase_elapsed_s'])}"
            return head
        if step is not None and steps:
            done = min(max(step / steps, 0.0), 1.0)
            filled = round(done * BAR_WIDTH)
            head += f"  step {step}/{steps}  [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done:4.0%}"
        elif step is not None:
            head += f"  step {step}"
        if phase == TRAINING and f.get("elapsed_s") is not None:
            head += f"  elapsed {duration_text(f['elapsed_s'])}"
            head += "  eta " + ("-" if f.get("eta_s") is None else duration_text(f["eta_s"]))
        return head

    def line(self) -> str:
        """The view as one line, as printed when the stream is not a TTY."""
        return " | ".join(" ".join(text.split()) for text in self.lines())

    # ------------------------------------------------------------------ output

    def _output(self, now: float) -> None:
        if self.tty:
            self._draw()
        else:
            text = self.line()
            if text == self._last_line and now - self._last_output < UNCHANGED_REPEAT * self.interval_s:
                return  # nothing new to say yet (a changed line may follow at the next update)
            self.stream.write(text + "\n")
            self.stream.flush()
            self._last_line = text
        self._last_output = now
        self._dirty = False

    def _draw(self) -> None:
        width = max(20, shutil.get_terminal_size().columns - 1)  # a wrapped line would break the cursor moves
        text = "".join(CLEAR_LINE + line[:width] + "\n" for line in self.lines())
        self.stream.write(self._erase_sequence() + text)
        self.stream.flush()
        self._drawn_lines = len(self.lines())

    def _erase_sequence(self) -> str:
        return CURSOR_UP_LINES.format(self._drawn_lines) + CLEAR_TO_END if self._drawn_lines else ""

    def write_above(self, text: str) -> None:
        """Write ``text`` (e.g. a log record) so that it stays above the live block."""
        with self._lock:
            if not self.tty or self._closed or not self._drawn_lines:
                self.stream.write(text)
                return
            self.stream.write(self._erase_sequence() + text)
            self._drawn_lines = 0
            self._draw()

    def log_stream(self) -> TextIO:
        """A stream for the console log handler (setup_logging(stream=...)) that keeps logs above the block."""
        return _AboveView(self) if self.tty else self.stream


class _AboveView:
    """File-like object that routes writes through LiveView.write_above()."""

    def __init__(self, view: LiveView):
        self.view = view

    def write(self, text: str) -> int:
        self.view.write_above(text)
        return len(text)

    def flush(self) -> None:
        self.view.stream.flush()

    def isatty(self) -> bool:
        return True
