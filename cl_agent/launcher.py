"""Start ``cl-agent run`` as a child process and take it down again (demo, tests, fault tools).

The child runs in its own session with its output appended to a log file.
``kill9`` kills the agent alone and checks that its trainer and server died with
it (they must: PR_SET_PDEATHSIG); ``terminate`` is the graceful SIGTERM path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from cl_agent.errors import CLAgentError


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc); empty if it is gone."""
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(p) for p in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def is_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set size) of ``pid`` in MiB, None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class AgentProcess:
    """``cl-agent run --config PATH`` as a child process in its own session, output appended to a log."""

    def __init__(self, config_path: Path, log_path: Path, threads: int | None = 1):
        """``threads``: OMP_NUM_THREADS for the agent (1 keeps tests light; None = the library default)."""
        self.log = open(log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cl_agent", "run", "--config", str(config_path)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.pid = self.process.pid
        self.started = time.monotonic()
        self.started_wall = time.time()

    def alive(self) -> bool:
        return self.process.poll() is None

    def children(self) -> list[int]:
        return child_pids(self.pid)

    def kill9(self, wait_children_s: float = 20.0) -> None:
        """SIGKILL the agent process only; its children must die with it (PR_SET_PDEATHSIG), waited for here."""
        children = self.children()
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        self.process.wait(10)
        deadline = time.monotonic() + wait_children_s
        while any(is_running(c) for c in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [c for c in children if is_running(c)]
        self._kill_group()
        self.log.close()
        if survivors:
            raise RuntimeError(f"agent children {survivors} outlived the killed agent {self.pid}")

    def terminate(self, timeout_s: float) -> int:
        """SIGTERM and wait; returns the exit code (the group is killed if it does not exit in time)."""
        try:
            if self.alive():
                self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return -999
        finally:
            self._kill_group()
            self.log.close()

    def _kill_group(self) -> None:
        """Clean-up only: the process group this object started (anything left in it)."""
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.alive():
            self.process.wait(10)

    def check(self) -> None:
        """Raise if the agent has exited (with where to look)."""
        if not self.alive():
            raise CLAgentError(f"the agent exited with code {self.process.returncode}; see {self.log.name}")
