"""The ``cl-agent`` command's entry point: what must happen before the command line interface is imported.

``cl-agent run`` stops cleanly (exit 0) on SIGINT or SIGTERM. Its handlers are installed
here, before typer, the configuration and the agent are imported (tens of milliseconds),
so that a stop asked for at any time of the start-up is carried out once the agent is up,
not a death by the signal (exit 143). Other commands keep Python's default handling.
"""

from __future__ import annotations

import signal
import sys
import threading

RUN_STOP = threading.Event()  # set by SIGINT/SIGTERM during `cl-agent run`


def request_stop_on_signals(stop_requested: threading.Event) -> None:
    """SIGINT and SIGTERM set ``stop_requested`` instead of killing the process."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop_requested.set())


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        request_stop_on_signals(RUN_STOP)
    from cl_agent.cli import main as cli_main

    cli_main()
