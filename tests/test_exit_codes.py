"""What a service manager sees: a port or lock held by another process is exit 75 (try again later), not 2."""

import fcntl
import subprocess
import sys

import pytest
import zmq

from cl_agent.agent import run_agent
from cl_agent.config import load_config
from cl_agent.errors import BusyError, CLAgentError, exit_code
from cl_agent.ingest import run_ingest
from cl_agent.metrics import serve_registry


def _config(tmp_path, **overrides):
    return load_config(None, {"agent.workdir": str(tmp_path / "work"), "repository.root": str(tmp_path / "models"),
                              "metrics.enabled": False, "agent.host_server": False, **overrides})


@pytest.fixture
def taken_port():
    socket = zmq.Context.instance().socket(zmq.ROUTER)
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    yield port
    socket.close(0)


@pytest.mark.parametrize("run", [run_agent, run_ingest])
def test_a_taken_ingest_port_is_busy_and_named(tmp_path, taken_port, run):
    cfg = _config(tmp_path, **{"ingest.labeled_endpoint": f"tcp://127.0.0.1:{taken_port}"})
    with pytest.raises(BusyError, match=f"cannot bind ingest.labeled_endpoint tcp://127.0.0.1:{taken_port}"):
        run(cfg)


def test_an_agent_already_running_in_the_workdir_is_busy(tmp_path):
    cfg = _config(tmp_path)
    (tmp_path / "work").mkdir()
    with open(tmp_path / "work" / "agent.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(BusyError, match="another agent .* is running in"):
            run_agent(cfg)


def test_a_taken_metrics_port_is_busy_and_other_refusals_are_not():
    from prometheus_client import CollectorRegistry

    first = serve_registry(CollectorRegistry(), "127.0.0.1", 0, "metrics.port")
    try:
        with pytest.raises(BusyError, match="in use: pick another metrics.port") as busy:
            serve_registry(CollectorRegistry(), "127.0.0.1", first.port, "metrics.port")
        assert exit_code(busy.value) == 75
        with pytest.raises(CLAgentError) as refused:
            serve_registry(CollectorRegistry(), "127.0.0.1", 70000, "metrics.port")
        assert not isinstance(refused.value, BusyError) and exit_code(refused.value) == 2
    finally:
        first.stop()


def test_the_command_exits_75_for_a_taken_port_and_2_for_a_bad_setting(tmp_path, taken_port):
    base = [sys.executable, "-m", "cl_agent", "run", "--set", f"agent.workdir={tmp_path / 'work'}",
            "--set", f"repository.root={tmp_path / 'models'}", "--set", "metrics.enabled=false"]
    busy = subprocess.run([*base, "--set", f"ingest.labeled_endpoint=tcp://127.0.0.1:{taken_port}"],
                          capture_output=True, text=True, timeout=120)
    assert busy.returncode == 75, busy.stderr
    assert f"cannot bind ingest.labeled_endpoint tcp://127.0.0.1:{taken_port}" in busy.stderr and "Traceback" not in busy.stderr
    (tmp_path / "file").write_text("x")
    bad = subprocess.run([*base, "--set", f"agent.workdir={tmp_path / 'file'}"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a folder" in bad.stderr, bad.stderr
