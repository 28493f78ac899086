"""Logging setup: plain text for people, JSON lines for machines, optionally also to a file.

Modules log with ``logging.getLogger(__name__)`` and pass structured fields with
``extra=``; both formats show them::

    log.info("experience trained", extra={"experience": 3, "seconds": 41.2})

    text: 2026-01-02T03:04:05.678Z INFO cl_agent.agent: experience trained experience=3 seconds=41.2
    json: {"time": "2026-01-02T03:04:05.678Z", "level": "info", "logger": "cl_agent.agent",
           "message": "experience trained", "experience": 3, "seconds": 41.2}
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import TextIO

from cl_agent.errors import CLAgentError

LOG_FILE = "agent.log"  # name of the log file inside the agent's working directory
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}


def _iso_time(created: float) -> str:
    t = dt.datetime.fromtimestamp(created, tz=dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def extra_fields(record: logging.LogRecord) -> dict:
    """The ``extra=`` fields of a record, in the order they were given."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonLinesFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, extra fields, exception text."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extra_fields(record).items():
            # An extra field never overwrites the four fixed ones.
            entry[key if key not in entry else f"extra_{key}"] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = record.stack_info
        # default=str: a Path, a numpy scalar or a datetime still produces a line.
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``TIME LEVEL logger: message key=value ...`` with the traceback on the lines after."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_iso_time(record.created)} {record.levelname} {record.name}: {record.getMessage()}"
        fields = extra_fields(record)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + record.stack_info
        return line


def setup_logging(
    level: str,
    json_lines: bool,
    file: Path | None = None,
    *,
    stream: TextIO | None = None,
    max_bytes: int = 0,
    backups: int = 3,
) -> list[logging.Handler]:
    """Configure the root logger: a handler on ``stream`` (default stderr) and, if given, one appending to ``file``.

    With ``max_bytes`` > 0 the file is rotated once it would pass that size: ``file`` becomes
    ``file.1``, the older ones move up, and only ``backups`` of them are kept (each log file has
    one writing process, as rotation needs). 0 lets the file grow.

    ``level`` is one of debug, info, warning, error (AgentSection.log_level); ``json_lines``
    selects JSON lines over plain text (AgentSection.log_json) for both handlers.
    Calling it again replaces the handlers it installed before (not other ones).
    Returns the installed handlers.
    """
    if level not in LEVELS:
        raise CLAgentError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_cl_agent", False):
            root.removeHandler(handler)
            handler.close()

    formatter: logging.Formatter = JsonLinesFormatter() if json_lines else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler(stream if stream is not None else sys.stderr)]
    if file is not None:
        file = Path(file)
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            if max_bytes > 0:
                handlers.append(RotatingFileHandler(file, mode="a", maxBytes=max_bytes, backupCount=max(1, backups), encoding="utf-8"))
            else:
                handlers.append(logging.FileHandler(file, mode="a", encoding="utf-8"))
        except OSError as e:
            raise CLAgentError(f"cannot open log file {file}: {e.strerror or e}") from None
    for handler in handlers:
        handler.setFormatter(formatter)
        handler._cl_agent = True  # marks handlers a later call may replace
        root.addHandler(handler)
    root.setLevel(LEVELS[level])
    # Third-party debug output (matplotlib font scans, PIL) drowns the agent's own.
    for noisy in ("matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(max(LEVELS[level], logging.INFO))
    return handlers
