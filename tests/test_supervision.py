"""The agent restarts a dead server or trainer after a growing pause, without stalling its own loop."""

import multiprocessing as mp
import time

from cl_agent.agent import Agent
from cl_agent.config import load_config
from cl_agent.metrics import AgentMetrics


def _dead_process():
    process = mp.get_context("fork").Process(target=int)
    process.start()
    process.join()
    return process


def test_a_server_that_keeps_dying_is_restarted_with_a_growing_pause_and_the_loop_never_blocks(tmp_path):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path)}))
    starts = []

    def start_server():  # a server whose port is taken: it exits as soon as it starts
        starts.append(time.monotonic())
        agent.server = _dead_process()

    agent._start_server = start_server
    agent.server = _dead_process()
    begin = time.monotonic()
    longest_call = 0.0
    while time.monotonic() - begin < 3.5:
        t0 = time.monotonic()
        agent._supervise({}, None, None)
        longest_call = max(longest_call, time.monotonic() - t0)
        time.sleep(0.02)
    # pauses of 1 s then 2 s: restarts near t = 1 and t = 3, not one per loop turn
    assert len(starts) == 2, [round(s - begin, 2) for s in starts]
    assert 0.9 <= starts[0] - begin <= 1.5
    assert longest_call < 0.5


def test_a_dead_trainer_is_restarted_after_its_pause_without_sleeping_in_the_loop(tmp_path):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path)}))
    starts = []
    agent._start_trainer = lambda: starts.append(time.monotonic())
    agent.trainer = _dead_process()
    metrics = AgentMetrics()
    t0 = time.monotonic()
    agent._supervise({}, metrics, None)
    assert time.monotonic() - t0 < 0.5  # the pause (2 s) is scheduled, not slept
    assert starts == []
    agent.stop_requested.wait(2.1)
    agent._supervise({}, metrics, None)
    assert len(starts) == 1
    assert metrics.value("trainer_failures_total") == 1  # counted once, when its restart was scheduled


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
