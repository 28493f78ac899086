"""A real ``cl-agent run`` process stopped by SIGTERM during its start-up exits 0, as documented."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _overrides(tmp_path) -> list[str]:
    values = {
        "agent.workdir": tmp_path / "agent",
        "repository.root": tmp_path / "models",
        "ingest.labeled_endpoint": "tcp://127.0.0.1:0",
        "ingest.frame_endpoint": "tcp://127.0.0.1:0",
        "ingest.control_endpoint": "tcp://127.0.0.1:0",
        "repository.announce_endpoint": "",
        "repository.fetch_endpoint": "",
        "metrics.enabled": "false",
        "metrics.console": "false",
        "agent.host_server": "false",
    }
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={value}"]
    return args


@contextlib.contextmanager
def _killed_if_left_running(process: subprocess.Popen):
    """Kill (and reap) ``process`` if it still runs when the block ends, however it ends."""
    try:
        yield
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_sigterm_during_start_up_stops_cleanly_with_exit_0(tmp_path):
    log = tmp_path / "agent" / "agent.log"  # created once run_agent has started (after the imports)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cl_agent", "run", *_overrides(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    with _killed_if_left_running(process):
        deadline = time.monotonic() + 30
        while not log.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the agent never started"
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)  # the trainer is not started yet
        code = process.wait(timeout=60)
        stderr = process.stderr.read().decode()
    assert code == 0, stderr[-2000:]
    state = json.loads((tmp_path / "agent" / "state.json").read_text())
    assert state["status"] == "stopped"
    assert "stopped" in log.read_text()


def test_a_crash_looping_hosted_server_shows_in_state_and_status_until_it_runs_again(tmp_path, capsys):
    import socket

    from agent_harness import tiny_agent_config
    from cl_agent.launcher import AgentProcess
    from cl_agent.status import print_status, read_state

    cfg, path = tiny_agent_config(
        tmp_path, **{"agent.host_server": True, "metrics.state_interval_s": 0.2, "agent.grace_period_s": 5.0}
    )
    host, port = cfg.serve.endpoint.removeprefix("tcp://").rsplit(":", 1)
    holder = socket.socket()  # another process's listener on serve.endpoint, as far as the server can tell
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind((host, int(port)))
    holder.listen()
    workdir = cfg.agent.workdir

    def state_when(predicate, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            agent.check()
            try:
                state = read_state(workdir)
            except Exception:  # noqa: BLE001 - a file being replaced; read again
                state = None
            if state is not None and predicate(state):
                return state
            time.sleep(0.1)
        raise AssertionError(f"state.json never matched; last {state}")

    agent = AgentProcess(path, tmp_path / "agent.out")
    try:
        state = state_when(lambda s: (s.get("server_restarts") or 0) >= 2, 90)
        assert "cannot bind serve.endpoint" in state["server_failure"] and "in use" in state["server_failure"]
        print_status(Path(workdir))
        out = capsys.readouterr().out
        line = next(row for row in out.splitlines() if row.startswith("hosted server:"))
        assert f"restarting ({state['server_restarts']} restarts; last: cannot bind serve.endpoint" in line
        assert "agent:" in out

        holder.close()  # the port is free: the next restart runs, and the agent hears it answer
        state = state_when(lambda s: s.get("server_failure") is None, 90)
        assert state["server_restarts"] >= 2 and state["status"] == "running"
        print_status(Path(workdir))
        assert "hosted server:" not in capsys.readouterr().out
        assert agent.terminate(60) == 0
    finally:
        holder.close()
        if agent.alive():
            agent.terminate(10)


# Sends the process SIGTERM from inside, at the moment it first imports the module named by its
# first argument, then runs `cl-agent` with the rest: a stop at a chosen point of the start-up.
SIGTERM_ON_IMPORT = """
import os, signal, sys

class SigtermOnImport:
    def __init__(self, name):
        self.name = name

    def find_spec(self, name, path=None, target=None):
        if name == self.name:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGTERM)
        return None

sys.meta_path.insert(0, SigtermOnImport(sys.argv.pop(1)))
sys.argv[0] = "cl-agent"
from cl_agent.entry import main
main()
"""


def _saved_frames(tmp_path):
    from cl_agent.reservoir import SAVED_FILE, Frame, Reservoir

    reservoir = Reservoir(5000)  # the default reservoir settings: the pools come back as they were
    for i in range(5):
        reservoir.add(Frame(bytes([i]) * 10, "raw", (1, 2, 5), "gray", "cam"))
    reservoir.save(tmp_path / "agent" / SAVED_FILE)
    return sorted(f.payload for f in reservoir.sample(100))


def _assert_stopped_cleanly(process, tmp_path, frames) -> None:
    from cl_agent.reservoir import SAVED_FILE, Reservoir

    with _killed_if_left_running(process):
        code = process.wait(timeout=60)
        stderr = process.stderr.read().decode()
    assert code == 0, f"exit {code}: {stderr[-2000:]}"
    state = json.loads((tmp_path / "agent" / "state.json").read_text())
    assert state["status"] == "stopped"
    again = Reservoir(5000)
    assert again.restore(tmp_path / "agent" / SAVED_FILE) == len(frames)  # the frames saved before are kept
    assert sorted(f.payload for f in again.sample(100)) == frames


# typer: while cl_agent.cli itself is imported; cl_agent.config: after typer, still at import;
# cl_agent.agent: in the run command, before the configuration is read; cl_agent.ingest: in run_agent.
@pytest.mark.parametrize("module", ["typer", "cl_agent.config", "cl_agent.agent", "cl_agent.ingest"])
def test_sigterm_at_any_point_of_the_start_up_imports_stops_cleanly_with_exit_0(tmp_path, module):
    frames = _saved_frames(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", SIGTERM_ON_IMPORT, module, "run", *_overrides(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _assert_stopped_cleanly(process, tmp_path, frames)


def _catches_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the signal mask from /proc (Linux)")
def test_sigterm_as_soon_as_the_command_can_take_it_stops_cleanly_with_exit_0(tmp_path):
    """The signal goes the moment the process catches SIGTERM at all (before that, Python itself is starting)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for attempt in range(3):
        root = tmp_path / str(attempt)
        frames = _saved_frames(root)
        process = subprocess.Popen([sys.executable, "-m", "cl_agent", "run", *_overrides(root)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        while not _catches_sigterm(process.pid):
            assert process.poll() is None, process.stderr.read().decode()
        process.send_signal(signal.SIGTERM)
        _assert_stopped_cleanly(process, root, frames)
