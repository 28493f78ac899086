"""The agent restarts a dead server or trainer after a growing pause, without stalling its own loop."""

import time

import pytest

import cl_agent.agent as agent_module
from cl_agent.agent import Agent
from cl_agent.config import load_config
from cl_agent.metrics import AgentMetrics


class FakeClock:
    """Stands in for the agent module's ``time``: monotonic() is set by the test; sleeping is a failure."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        raise AssertionError(f"the agent loop slept {seconds} s: restart pauses must be scheduled, not slept")

    def __getattr__(self, name):
        return getattr(time, name)


class DeadProcess:
    """A child process that has exited (a trainer that crashed, a server whose port is taken)."""

    exitcode = 1

    def is_alive(self) -> bool:
        return False


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(agent_module, "time", fake)
    return fake


def _run_dying_child(agent, name: str, clock: FakeClock, state: dict, metrics, seconds: float) -> list[float]:
    """Let ``name`` die at once after every start for ``seconds`` of fake time; the times of its restarts."""
    starts = []

    def start():
        starts.append(clock.now)
        setattr(agent, name, DeadProcess())

    setattr(agent, f"_start_{name}", start)
    setattr(agent, name, DeadProcess())
    begin = clock.now
    while clock.now - begin <= seconds:
        for _ in range(3):  # several loop turns at the same instant start it at most once
            agent._supervise(state, metrics, None)
        clock.now += 0.25
    return [t - begin for t in starts]


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip([0.0, *times], times)]


def test_a_trainer_that_keeps_dying_is_restarted_after_2_4_8_16_then_30_s(tmp_path, clock):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path)}))
    metrics = AgentMetrics()
    begin = clock.now
    starts = _run_dying_child(agent, "trainer", clock, {}, metrics, 150.0)
    assert _gaps(starts) == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0], starts
    assert agent.trainer_restarts == 9  # the ninth restart is scheduled, 30 s after the eighth start
    assert metrics.value("trainer_failures_total") == 9  # counted once per death, when its restart is scheduled
    assert agent._restart_at["trainer"] == begin + starts[-1] + 30.0  # the cap holds: no 256 s pause


def test_a_server_that_keeps_dying_is_restarted_after_1_2_4_8_16_then_30_s(tmp_path, clock):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path)}))
    state = {}
    starts = _run_dying_child(agent, "server", clock, state, AgentMetrics(), 120.0)
    assert _gaps(starts) == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0], starts
    assert state["server_restarts"] == agent.server_restarts == 8
    assert state["server_failure"] == "exited with code 1 (see server.log)"


def test_a_restart_pause_is_not_slept_and_nothing_starts_before_it_ends(tmp_path, clock):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path)}))
    starts = []
    agent._start_trainer = lambda: starts.append(clock.now)
    agent.trainer = DeadProcess()
    agent._supervise({}, AgentMetrics(), None)  # FakeClock.sleep fails the test if the pause were slept
    clock.now += 1.75
    agent._supervise({}, AgentMetrics(), None)
    assert starts == []
    clock.now += 0.25
    agent._supervise({}, AgentMetrics(), None)
    assert starts == [clock.now]


def _wait_dead(process, timeout_s=60.0):
    process.join(timeout_s)
    assert not process.is_alive()


def test_a_hosted_server_that_cannot_run_with_its_configuration_stops_the_agent_with_the_reason(tmp_path):
    # A provider name onnxruntime knows but this machine does not have: no restart would help.
    import onnxruntime

    missing = next(p for p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") if p not in onnxruntime.get_available_providers())
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path), "serve.providers": [missing, "CPUExecutionProvider"],
                                     "serve.endpoint": "tcp://127.0.0.1:0", "repository.announce_endpoint": ""}))
    agent.children_log_to_stderr = False
    agent._start_server()
    _wait_dead(agent.server)
    assert agent.server.exitcode == 2
    state = {}
    agent._supervise(state, AgentMetrics(), None)
    assert agent.stop_requested.is_set() and agent.exit_code == 2
    assert state["stop_error"].startswith("hosted server cannot run:") and missing in state["stop_error"]
    assert "server" not in agent._restart_at


def test_a_hosted_server_whose_port_is_taken_is_restarted(tmp_path):
    import zmq

    taken = zmq.Context.instance().socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    try:
        agent = Agent(load_config(None, {"agent.workdir": str(tmp_path), "serve.endpoint": f"tcp://127.0.0.1:{port}",
                                         "repository.announce_endpoint": ""}))
        agent.children_log_to_stderr = False
        agent._start_server()
        _wait_dead(agent.server)
        assert agent.server.exitcode == 1
        agent._supervise({}, AgentMetrics(), None)
        assert not agent.stop_requested.is_set() and "server" in agent._restart_at
    finally:
        taken.close(0)
