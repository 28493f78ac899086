"""The agent asks its hosted server which version it serves, also when serve.endpoint binds every interface."""

import threading

import zmq

from cl_agent.agent import Agent
from cl_agent.config import connect_endpoint
from cl_agent.config import load_config
from cl_agent.metrics import AgentMetrics


def test_a_wildcard_bind_is_reached_on_loopback():
    assert connect_endpoint("tcp://*:5558") == "tcp://127.0.0.1:5558"
    assert connect_endpoint("tcp://0.0.0.0:5558") == "tcp://127.0.0.1:5558"
    assert connect_endpoint("tcp://10.0.0.2:5558") == "tcp://10.0.0.2:5558"
    assert connect_endpoint("ipc:///run/serve.sock") == "ipc:///run/serve.sock"


def test_the_served_version_is_read_from_a_server_bound_to_every_interface(tmp_path):
    from cl_agent.config import WireSection
    from cl_agent.wire import decode_message, reply

    context = zmq.Context.instance()
    server = context.socket(zmq.ROUTER)
    port = server.bind_to_random_port("tcp://*")
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path), "serve.endpoint": f"tcp://*:{port}",
                                     "metrics.state_interval_s": 0.05}))
    state = {}
    watcher = threading.Thread(target=agent._watch_served_version, args=(state, AgentMetrics(), None), daemon=True)
    watcher.start()
    try:
        assert server.poll(5000), "the watcher never asked"
        parts = server.recv_multipart()
        envelope, body = (parts[:2], parts[2:]) if parts[1] == b"" else (parts[:1], parts[1:])
        request = decode_message(body, WireSection())
        server.send_multipart(envelope + reply("status", "server", request.seq, model_version=7))
        deadline = threading.Event()
        for _ in range(100):
            if state.get("served_version") == 7:
                break
            deadline.wait(0.05)
        assert state.get("served_version") == 7
    finally:
        agent.stop_requested.set()
        watcher.join(5)
        server.close(linger=0)
