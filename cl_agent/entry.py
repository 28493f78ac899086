"""The ``cl-agent`` command's entry point: what must happen before the command line interface is imported.

``cl-agent run`` and ``cl-agent serve`` stop cleanly (exit 0) on SIGINT or SIGTERM. Their
handlers are installed here, before typer, the configuration and the agent are imported (tens
of milliseconds), so that a stop asked for at any time of the start-up is carried out once the
agent or server is up, not a death by the signal (exit 143). They replace an ignored SIGINT
too: a shell starts a background job (``cl-agent serve &`` in a script) with SIGINT ignored.
Other commands keep Python's default handling.
"""

from __future__ import annotations

import signal
import sys
import threading

RUN_STOP = threading.Event()  # set by SIGINT/SIGTERM during `cl-agent run`
SERVE_STOP = threading.Event()  # set by SIGINT/SIGTERM during `cl-agent serve`
STOP_EVENTS = {"run": RUN_STOP, "serve": SERVE_STOP}  # the commands that stop cleanly on a signal


def request_stop_on_signals(stop_requested: threading.Event) -> None:
    """SIGINT and SIGTERM set ``stop_requested`` instead of killing the process (or being ignored)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())


def main() -> None:
    stop = STOP_EVENTS.get(sys.argv[1]) if len(sys.argv) > 1 else None
    if stop is not None:
        request_stop_on_signals(stop)
    from cl_agent.cli import main as cli_main

    cli_main()
