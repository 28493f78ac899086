"""A failure inside the running ingestion loop is reported and stops its owner, never leaves it running deaf."""

import os
import signal
import threading

import pytest

from cl_agent.client import LabeledClient
from cl_agent.config import load_config
from cl_agent.errors import CLAgentError
from cl_agent.ingest import run_ingest
from ingest_support import free_port, images, make_service, wait_until


def _break_experiences(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "experiences").write_text("not a folder")  # cutting an experience will fail


def test_a_loop_failure_is_kept_for_the_owner(tmp_path):
    _break_experiences(tmp_path)
    with make_service(tmp_path) as service:
        assert service.failure is None
        client = LabeledClient(service.endpoints["labeled"], "s", timeout_s=0.5, retries=0)
        assert client.send(images(2), ["a", "b"], encoding="png").ok
        with pytest.raises(CLAgentError):
            client.end_experience()  # the cut fails: no answer
        client.close()
        assert wait_until(lambda: service.failure is not None)
        assert isinstance(service.failure, OSError)


def test_the_ingest_command_exits_with_the_error_when_its_loop_dies(tmp_path):
    workdir = tmp_path / "work"
    _break_experiences(workdir)
    port = free_port()
    cfg = load_config(None, {
        "agent.workdir": str(workdir),
        "ingest.labeled_endpoint": f"tcp://127.0.0.1:{port}",
        "ingest.frame_endpoint": "tcp://127.0.0.1:0",
        "ingest.control_endpoint": "",
    })

    def send():
        client = LabeledClient(f"tcp://127.0.0.1:{port}", "s", timeout_s=0.5, retries=2)
        client.send(images(1), ["a"], encoding="png")
        try:
            client.end_experience()
        except CLAgentError:
            pass
        client.close()

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # Were the command to run on deaf, this stops it (and the test fails instead of hanging).
    timer = threading.Timer(20.0, lambda: os.kill(os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        with pytest.raises(CLAgentError, match="ingestion failed"):
            run_ingest(cfg)
    finally:
        timer.cancel()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def test_status_says_an_agent_stopped_on_an_error_not_that_it_exited_cleanly(tmp_path):
    from cl_agent.status import describe_liveness, initial_state

    state = initial_state() | {"status": "stopped", "stop_error": "ingestion failed: OSError: disk"}
    running, text = describe_liveness(state)
    assert not running
    assert "error" in text and "ingestion failed: OSError: disk" in text and "cleanly" not in text
