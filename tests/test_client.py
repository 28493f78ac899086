"""LabeledClient: Lazy Pirate retries keep the seq, reconnect to a restarted agent, give up loudly."""

import json
import threading
import time

import pytest
import zmq

from cl_agent.client import AgentUnavailable, LabeledClient
from cl_agent.wire import reply
from ingest_support import free_port, images, make_service


def test_no_agent_raises_after_retries_and_keeps_the_message_pending():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    client = LabeledClient(endpoint, "s", timeout_s=0.1, retries=2)
    start = time.monotonic()
    with pytest.raises(AgentUnavailable, match="after 2 retries"):
        client.send(images(1), ["a"])
    # two retries of 0.1 s; the upper bound only catches retries without end (loose: the machine may be loaded)
    assert 0.25 < time.monotonic() - start < 10 and client.in_flight == 1 and client.reconnects == 2
    client.close()


def test_retry_resends_the_same_seq_after_a_silent_agent():
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    seen: list[int] = []

    def silent_then_ack():
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.bind(endpoint)
        for answer in (False, True):
            identity, empty, header, *_ = sock.recv_multipart()
            seq = json.loads(header)["seq"]
            seen.append(seq)
            if answer:
                sock.send_multipart([identity, b"", *reply("ack", "agent", seq, accepted=1)])
        sock.close(linger=1000)

    thread = threading.Thread(target=silent_then_ack)
    thread.start()
    client = LabeledClient(endpoint, "s", timeout_s=0.3, retries=3)
    ack = client.send(images(1), ["a"])
    thread.join(5)
    client.close()
    assert ack.ok and len(seen) == 2 and seen[0] == seen[1] == ack.seq


def test_reconnects_to_an_agent_that_starts_late_and_pipelines(tmp_path):
    port = free_port()
    client = LabeledClient(f"tcp://127.0.0.1:{port}", "s", timeout_s=0.3, retries=20, window=4)
    seqs = [client.submit(images(2, seed=i), ["a", "b"]) for i in range(4)]  # window full, nobody listening
    service = make_service(tmp_path, ingest={"labeled_endpoint": f"tcp://127.0.0.1:{port}"})
    time.sleep(0.4)
    with service:
        seqs += [client.submit(images(2, seed=i), ["a", "b"]) for i in range(4, 10)]
        acks = client.flush()
        counters = service.counters()
    client.close()
    assert [a.seq for a in acks] == seqs and all(a.ok and not a.duplicate for a in acks)
    assert counters["labeled_images_acked"] == 20


def test_nack_is_returned_not_raised(tmp_path):
    with make_service(tmp_path, spool={"max_classes": 1}) as service:
        client = LabeledClient(service.endpoints["labeled"], "s")
        assert client.send(images(1), ["a"]).ok
        ack = client.send(images(1), ["b"])
        client.close()
    assert not ack.ok and ack.reason == "too_many_classes" and "max_classes" in ack.detail


def test_a_message_above_the_wire_limit_is_refused_before_sending_and_holds_nothing_up(tmp_path):
    from cl_agent.client import FrameClient
    from cl_agent.errors import CLAgentError

    limit = 50_000
    with make_service(tmp_path, wire={"max_message_bytes": limit}) as service:
        client = LabeledClient(service.endpoints["labeled"], "s", timeout_s=1.0, retries=2, window=4, max_message_bytes=limit)
        before = client.submit(images(2, seed=1), ["a", "b"], encoding="raw")
        # 120 000 raw bytes: the agent's socket would drop the connection on it, and on every resend.
        with pytest.raises(CLAgentError, match="not sent: a labeled message of 1 images is 12.... bytes, above the receiver's wire limit of 50000"):
            client.submit(images(1, size=200), ["big"], encoding="raw")
        after = client.submit(images(2, seed=2), ["a", "b"], encoding="raw")
        acks = client.flush()
        client.close()
        assert [a.seq for a in acks] == [before, after] == [before, before + 1] and all(a.ok for a in acks)
        assert service.counters()["labeled_images_acked"] == 4
        with FrameClient(service.endpoints["frames"], "cam", max_message_bytes=limit) as frames:
            with pytest.raises(CLAgentError, match="not sent: a frame is"):
                frames.send(images(1, size=200)[0], encoding="raw")
            assert frames.send(images(1)[0]) and frames.sent == 1
    with pytest.raises(CLAgentError, match="max_message_bytes must be an integer >= 1"):
        LabeledClient("tcp://127.0.0.1:1", max_message_bytes=0)


def test_a_bad_endpoint_is_a_clear_error_and_leaves_no_socket_open():
    import numpy as np

    from cl_agent.client import FrameClient
    from cl_agent.errors import CLAgentError
    from cl_agent.inference import InferenceClient

    context = zmq.Context()
    for make in (
        lambda: LabeledClient("nowhere", context=context),
        lambda: FrameClient("localhost:5555", context=context),
        lambda: InferenceClient("tcp//x", context=context).predict(np.zeros((1, 8, 8, 3), np.uint8)),
    ):
        with pytest.raises(CLAgentError, match="cannot connect to .*expected an endpoint like tcp://HOST:PORT"):
            make()
    terminated = threading.Thread(target=context.term)  # term() waits for every socket of the context to close
    terminated.start()
    terminated.join(5)
    assert not terminated.is_alive(), "a socket was left open"


def test_a_bad_label_is_refused_before_sending_not_truncated(tmp_path):
    from cl_agent.errors import CLAgentError

    with make_service(tmp_path) as service:
        client = LabeledClient(service.endpoints["labeled"], "s", window=2)
        for bad in (None, 1.5, " circle"):
            with pytest.raises(CLAgentError, match="not sent: label 1 "):
                client.submit(images(2), ["a", bad])
        assert client.send(images(2), ["a", "circle"]).ok and client.in_flight == 0
        client.close()
        assert service.counters()["labeled_images_acked"] == 2


def _no_pipe_until_connected(monkeypatch, module):
    """Make the client's socket hold messages only once a connection is up (ZMQ_IMMEDIATE), as a socket
    whose CURVE handshake is refused does: a blocking send would then wait for ever."""
    real_connect = module.connect

    def connect(sock, endpoint, *args):
        sock.immediate = 1
        return real_connect(sock, endpoint, *args)

    monkeypatch.setattr(module, "connect", connect)


@pytest.mark.timeout(30)
def test_a_message_no_connection_takes_is_kept_and_given_up_after_the_retries(monkeypatch):
    import cl_agent.client as client_module

    _no_pipe_until_connected(monkeypatch, client_module)
    client = LabeledClient(f"tcp://127.0.0.1:{free_port()}", "robot", timeout_s=0.2, retries=1)
    started = time.monotonic()
    with pytest.raises(AgentUnavailable, match="after 1 retries"):
        client.send(images(2), ["a", "b"])
    assert time.monotonic() - started < 5
    assert client.in_flight == 1 and client.reconnects == 1  # kept, to be resent on the next call
    client.close()


@pytest.mark.timeout(30)
def test_an_inference_request_no_connection_takes_times_out(monkeypatch):
    import cl_agent.inference as inference_module
    from cl_agent.inference import InferenceClient, InferenceError

    _no_pipe_until_connected(monkeypatch, inference_module)
    client = InferenceClient(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.2, retries=1)
    started = time.monotonic()
    with pytest.raises(InferenceError, match="after 2 attempts"):
        client.predict(images(1))
    assert time.monotonic() - started < 5
    client.close()


def test_a_restarted_client_with_the_same_sender_id_is_not_taken_for_a_retry(tmp_path):
    # A robot program that restarts keeps its sender id; its new messages must be stored, not acked as duplicates.
    with make_service(tmp_path) as service:
        acks = []
        for run in range(2):
            client = LabeledClient(service.endpoints["labeled"], "s", window=2)  # a fresh process: no seq carried over
            acks += [client.send(images(1, seed=10 * run + i), ["a"]) for i in range(3)]
            client.close()
        counters = service.counters()
    assert all(a.ok and not a.duplicate for a in acks), [(a.seq, a.duplicate) for a in acks]
    assert len({a.seq for a in acks}) == 6
    assert counters["labeled_images_acked"] == 6
