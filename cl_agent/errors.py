"""Errors the command line reports as a readable message (exit code 2), not a traceback."""


class CLAgentError(Exception):
    """A user-facing failure: bad input, a missing file, a refused operation."""
