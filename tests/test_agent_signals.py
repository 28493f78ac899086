"""A real ``cl-agent run`` process stopped by SIGTERM during its start-up exits 0, as documented."""

import json
import os
import signal
import subprocess
import sys
import time


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
