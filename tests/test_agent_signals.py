"""A real ``cl-agent run`` process stopped by SIGTERM during its start-up exits 0, as documented."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


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


def test_sigterm_during_start_up_stops_cleanly_with_exit_0(tmp_path):
    log = tmp_path / "agent" / "agent.log"  # created once run_agent has started (after the imports)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "cl_agent", "run", *_overrides(tmp_path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 30
        while not log.exists():
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "the agent never started"
            time.sleep(0.005)
        process.send_signal(signal.SIGTERM)  # the trainer is not started yet
        code = process.wait(timeout=60)
        stderr = process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
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
