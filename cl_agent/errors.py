"""Errors the command line reports as a readable message, not a traceback.

Exit codes: 2 for a ``CLAgentError`` (bad input, a refused configuration: starting again
unchanged fails again), 75 (``EX_TEMPFAIL``) for a ``BusyError`` (a port or a lock that
another process holds now, such as the previous agent still stopping: a later start may work).
"""

from __future__ import annotations

import errno

EXIT_ERROR = 2
EXIT_BUSY = 75


class CLAgentError(Exception):
    """A user-facing failure: bad input, a missing file, a refused operation."""


class BusyError(CLAgentError):
    """Something this process needs is held by another process right now: a port, a lock."""


def bind_failure(message: str, error: Exception) -> CLAgentError:
    """The error for a bind that failed with ``error``: a BusyError when the address is in use."""
    kind = BusyError if getattr(error, "errno", None) == errno.EADDRINUSE else CLAgentError
    return kind(f"{message}: {error}")


def exit_code(error: CLAgentError) -> int:
    return EXIT_BUSY if isinstance(error, BusyError) else EXIT_ERROR
