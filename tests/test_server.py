"""Serving with real onnxruntime sessions and ZeroMQ sockets: answers, refusals, hot swaps, clean exit."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import zmq
from prometheus_client import generate_latest
from torch import nn

from ingest_support import wait_until

from cl_agent.config import ExportSection, ServeSection
from cl_agent.export import export_onnx
from cl_agent.errors import CLAgentError
from cl_agent.inference import InferenceClient, InferenceError
from cl_agent.repository import Announcer, ModelRepository
from cl_agent.server import Server, _ArrivalRate, _predictions_json, _ranked
from cl_agent.wire import decode_message, encode_message, pack_message

CLASSES = ["cat", "dog", "cup"]
SIZE = 16


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, len(CLASSES))
    ).eval()


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory) -> list[Path]:
    """Two tiny models with different weights: one exported, the other a copy with every weight scaled."""
    import onnx
    from onnx import numpy_helper

    folder = tmp_path_factory.mktemp("onnx")
    first, second = folder / "tiny0.onnx", folder / "tiny1.onnx"
    export_onnx([tiny_net(0)], first, image_size=SIZE, mean=[0.5] * 3, std=[0.25] * 3, export=ExportSection())
    graph = onnx.load(str(first))
    for init in graph.graph.initializer:
        array = numpy_helper.to_array(init)
        if array.dtype == np.float32 and array.size > 3:  # weights, not the normalisation constants
            init.CopyFrom(numpy_helper.from_array(array * -1.5, init.name))
    onnx.save(graph, str(second))
    return [first, second]


def publish(repo: ModelRepository, path: Path, **manifest) -> int:
    return repo.publish(path, {"class_names": CLASSES, "image_size": SIZE, **manifest})


def serve_section(**overrides) -> ServeSection:
    return ServeSection(**{"endpoint": "tcp://127.0.0.1:*", "poll_s": 0.05, "max_batch": 8, **overrides})


def images(n: int, seed: int = 0, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def checked(server: Server) -> None:
    """Ask ``server`` to look at its repository; return once a check that began after this call has finished."""
    begun = server.checks_started
    server.check_now()
    assert wait_until(lambda: server.checks_done > begun)


@pytest.fixture
def repo(tmp_path) -> ModelRepository:
    return ModelRepository(tmp_path / "models", "student", keep_last=3)


def test_answers_match_onnxruntime_with_top_k_and_version(repo, onnx_models):
    publish(repo, onnx_models[0])
    batch = images(3)
    (expected,) = ort.InferenceSession(str(onnx_models[0]), providers=["CPUExecutionProvider"]).run(
        ["probs"], {"images": batch}
    )
    with Server(repo, serve_section()) as server, InferenceClient(server.endpoint, timeout_s=5) as client:
        result = client.predict(batch, top_k=2)
        assert result.model_version == 1 and result.model == "student"
        assert [len(p) for p in result.predictions] == [2, 2, 2]
        for row, prediction in zip(expected, result.predictions):
            best = np.argsort(-row)[:2]
            assert [name for name, _ in prediction] == [CLASSES[i] for i in best]
            np.testing.assert_allclose([p for _, p in prediction], row[best], atol=1e-5)
        # Default top_k is capped at the number of classes; other sizes are resized; JPEG works too.
        assert len(client.predict([np.zeros((40, 30, 3), np.uint8)]).predictions[0]) == 3
        jpeg_client = InferenceClient(server.endpoint, encoding="jpeg")
        assert jpeg_client.predict(images(1, size=24)).model_version == 1
        jpeg_client.close()


def test_bad_requests_get_errors_and_server_keeps_answering(repo, onnx_models):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section()) as server, InferenceClient(server.endpoint) as client:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(server.endpoint)
        dealer.send_multipart(encode_message("infer", "x", 1, list(images(1)), top_k=0))  # the client refuses to send it
        dealer.send_multipart([b"not json"])
        dealer.send_multipart(encode_message("frame", "x", 1, list(images(1))))
        reasons = [decode_message(dealer.recv_multipart(), server.wire).header["reason"] for _ in range(3)]
        assert reasons == ["bad_top_k", "bad_json", "bad_kind"]
        dealer.close(0)
        assert client.predict(images(1)).model_version == 1
        status = client.status()
        assert status["model"] == "student" and status["model_version"] == 1
        assert status["counters"]["errors"] == 3 and status["counters"]["images"] == 1
        assert status["recent_batches"] == 1 and status["inference_ms_p50"] > 0 and status["handling_ms_p50"] > 0
        assert client.status(reset_recent=True)["recent_batches"] == 1
        assert client.status()["recent_batches"] == 0


def test_no_model_yet_then_first_version_is_picked_up(repo, onnx_models):
    with Server(repo, serve_section()) as server, InferenceClient(server.endpoint) as client:
        with pytest.raises(InferenceError, match="no_model"):
            client.predict(images(1))
        publish(repo, onnx_models[0])
        assert wait_until(lambda: server.version == 1)
        assert client.predict(images(1)).model_version == 1


def pipelined(server: Server, requests: int, per_request: int) -> list:
    """Send ``requests`` raw requests of ``per_request`` images back to back from one DEALER; their replies."""
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(server.endpoint)
    for seq in range(requests):
        dealer.send_multipart(encode_message("infer", "pipeline", seq, list(images(per_request, seed=seq)), encoding="raw"))
    replies = [decode_message(dealer.recv_multipart(), server.wire) for _ in range(requests)]
    dealer.close(0)
    return replies


def test_pipelined_requests_are_micro_batched(repo, onnx_models):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section(max_batch=32, max_wait_ms=5)) as server:
        # The first run is held up, so the other 19 requests are waiting when it ends, however busy the machine.
        dealer = _queue_behind_first_run(server, "pipeline", [1] * 19)
        try:
            replies = [decode_message(dealer.recv_multipart(), server.wire) for _ in range(20)]
        finally:
            dealer.close(0)
        assert sorted(r.seq for r in replies) == list(range(20))
        assert all(r.kind == "prediction" for r in replies)
        assert server.counters["batches"] < 20


class _SlowSession:
    """An onnxruntime session whose first run, or ``every`` run, takes ``delay_s`` longer (requests queue up behind it)."""

    def __init__(self, session, delay_s: float, every: bool = False):
        self._session, self._delay_s, self._every, self.started = session, delay_s, every, threading.Event()

    def run(self, *args, **kwargs):
        if self._every or not self.started.is_set():
            self.started.set()
            time.sleep(self._delay_s)
        return self._session.run(*args, **kwargs)


def _slow_down(server: Server, delay_s: float, every: bool = False) -> _SlowSession:
    """Make the server's next ``session.run`` (or each one, ``every``) take ``delay_s`` longer; that session."""
    import dataclasses

    slow = _SlowSession(server._model.session, delay_s, every)
    server._model = dataclasses.replace(server._model, session=slow)
    return slow


def _queue_behind_first_run(server: Server, sender: str, sizes: list[int], delay_s: float = 0.5) -> zmq.Socket:
    """Send a 1-image request whose run is held ``delay_s``, then, while it runs, one request of each size in
    ``sizes`` (seqs 1, 2, ...): they are all queued when the first ends. The DEALER that sent them."""
    slow = _slow_down(server, delay_s)
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(server.endpoint)
    try:
        dealer.send_multipart(encode_message("infer", sender, 0, list(images(1)), encoding="raw"))
        assert slow.started.wait(5)
        for seq, n in enumerate(sizes, start=1):
            dealer.send_multipart(encode_message("infer", sender, seq, list(images(n, seed=seq)), encoding="raw"))
    except BaseException:
        dealer.close(0)
        raise
    return dealer


def test_arrival_rate_expects_requests_only_at_the_rate_seen_over_recent_batches():
    rate = _ArrivalRate(batches=8)
    assert rate.expected_within(0.002, now=0.0, queued=5) == 0  # nothing seen yet
    # 250 requests/s, one per batch: two that meet by chance say little; another in 2 ms is unlikely.
    for k in range(8):
        rate.record(k * 0.004, 1)
    assert rate.expected_within(0.002, now=0.032, queued=2) == pytest.approx((7 + 2) * 0.002 / 0.032)
    assert rate.expected_within(0.002, now=0.032, queued=2) < 1
    # Concurrent clients: batches of 6 every 3 ms; more are due within the wait.
    for k in range(8):
        rate.record(1.0 + k * 0.003, 6)
    assert rate.expected_within(0.002, now=1.024, queued=3) > 1
    # The oldest batch leaves the window: a long idle gap does not keep a stale fast rate.
    assert rate.expected_within(0.002, now=100.0, queued=2) < 1


def test_requests_that_meet_at_a_light_load_are_not_held_for_more(repo, onnx_models):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section(max_batch=32, max_wait_ms=100)) as server:
        with InferenceClient(server.endpoint, timeout_s=5) as client:
            for _ in range(8):  # a light load: one request every 0.3 s
                client.predict(images(1))
                time.sleep(0.3)
        # Two requests queued together behind a slow run: at about 4 requests/s, a third within
        # 100 ms is not expected (0.4 of one), so the pair runs at once instead of waiting for it.
        dealer = _queue_behind_first_run(server, "light", [1, 1], delay_s=0.3)
        try:
            replies = [decode_message(dealer.recv_multipart(), server.wire) for _ in range(3)]
        finally:
            dealer.close(0)
        assert sorted(r.seq for r in replies) == [0, 1, 2] and all(r.kind == "prediction" for r in replies)
        assert server.counters["batches"] == 8 + 2  # the pair shared one run
        assert server.counters["held_batches"] == 0


def test_a_steady_stream_of_concurrent_requests_fills_held_batches(repo, onnx_models):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section(max_batch=32, max_wait_ms=20)) as server:
        _slow_down(server, 0.02, every=True)  # every run 20 ms: a request every 2 ms finds others queued
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(server.endpoint)
        try:
            for seq in range(100):
                dealer.send_multipart(encode_message("infer", "stream", seq, list(images(1, seed=seq)), encoding="raw"))
                time.sleep(0.002)
            replies = [decode_message(dealer.recv_multipart(), server.wire) for _ in range(100)]
        finally:
            dealer.close(0)
        assert sorted(r.seq for r in replies) == list(range(100))
        assert server.counters["held_batches"] >= 1  # at hundreds of requests/s, waiting 20 ms brings more
        assert server.counters["batches"] < 50


def test_requests_read_or_queued_when_the_server_stops_are_answered(repo, onnx_models):
    publish(repo, onnx_models[0])
    # inproc: a sent message is in the server's queue when send returns, so "queued at the stop" needs no sleep
    endpoint = f"inproc://drain-on-stop-{os.getpid()}-{time.monotonic_ns()}"
    server = Server(repo, serve_section(endpoint=endpoint, max_batch=4, max_wait_ms=0)).start()
    try:
        # While the first runs: 3 + 3 images, more than max_batch, so one request waits as the pending one.
        dealer = _queue_behind_first_run(server, "queued", [3] * 10)
    except BaseException:
        server.stop()
        raise
    try:
        server.stop()  # while the first still runs: the other ten wait in the socket
        assert dealer.poll(2000)
        replies = []
        while dealer.poll(200):
            replies.append(decode_message(dealer.recv_multipart(), server.wire))
        assert sorted(r.seq for r in replies) == list(range(11))
        assert all(r.kind == "prediction" for r in replies)
    finally:
        dealer.close(0)
        server.stop()


def test_a_request_above_the_wire_limit_is_refused_by_the_client_at_once(repo, onnx_models):
    from cl_agent.config import WireSection

    publish(repo, onnx_models[0])
    limit = 20_000
    with Server(repo, serve_section(), WireSection(max_message_bytes=limit)) as server:
        with InferenceClient(server.endpoint, timeout_s=30, retries=2, max_message_bytes=limit) as client:
            started = time.monotonic()
            with pytest.raises(InferenceError, match="above the receiver's wire limit of 20000 bytes") as refused:
                client.predict(images(100))  # 76 800 raw bytes at the model's size: the server's socket would drop them unread
            # refused before sending: sending it would have meant waiting out a 30 s timeout
            assert refused.value.reason == "message_too_large" and time.monotonic() - started < 10
            assert client.predict(images(1)).model_version == 1  # the client still works
            # One image above the limit but larger than the model's input: resized to it, then sent.
            assert client.predict(images(1, size=100)).model_version == 1
        with pytest.raises(CLAgentError, match="max_message_bytes must be an integer >= 1"):
            InferenceClient(server.endpoint, max_message_bytes=0)


def test_partial_version_folders_are_never_loaded(repo, onnx_models):
    publish(repo, onnx_models[0])
    model_dir = repo.model_dir
    # A publisher that died before its rename, and a hand copy cut short (model, no manifest).
    temp = model_dir / ".tmp-5-dead"
    temp.mkdir()
    shutil.copy(onnx_models[1], temp / "model.onnx")
    (model_dir / "6").mkdir()
    (model_dir / "6" / "model.onnx").write_bytes(onnx_models[1].read_bytes()[:100])
    with Server(repo, serve_section()) as server, InferenceClient(server.endpoint) as client:
        checked(server)
        assert server.version == 1 and server.counters["swap_failures"] == 0
        assert client.predict(images(1)).model_version == 1
        assert publish(repo, onnx_models[1]) == 7
        assert wait_until(lambda: server.version == 7)


def test_corrupt_or_mismatched_versions_are_refused_and_old_keeps_answering(repo, onnx_models, caplog):
    publish(repo, onnx_models[0])
    # No polling: the server looks only when told, so each bad version is complete before it is seen.
    with Server(repo, serve_section(poll_s=3600)) as server, InferenceClient(server.endpoint) as client:
        # v2: bytes changed after publishing (sha256 mismatch).
        v2 = publish(repo, onnx_models[1])
        data = bytearray(repo.model_path(v2).read_bytes())
        data[len(data) // 2] ^= 0xFF
        repo.model_path(v2).write_bytes(bytes(data))
        server.check_now()
        assert wait_until(lambda: server.counters["swap_failures"] == 1)
        # v3: consistent hash but not an ONNX model.
        junk = repo.model_dir.parent / "junk.onnx"
        junk.write_bytes(b"this is not onnx")
        publish(repo, junk)
        server.check_now()
        assert wait_until(lambda: server.counters["swap_failures"] == 2)
        # v4: a model whose input size disagrees with its manifest.
        repo.publish(onnx_models[1], {"class_names": CLASSES, "image_size": 32})
        server.check_now()
        assert wait_until(lambda: server.counters["swap_failures"] == 3)
        checked(server)  # refused versions are not retried
        assert server.counters["swap_failures"] == 3
        assert server.version == 1 and client.predict(images(2)).model_version == 1
        assert "sha256" in caplog.text and "cannot load" in caplog.text and "image_size" in caplog.text
        # A good version after the bad ones is taken.
        assert publish(repo, onnx_models[1]) == 5
        server.check_now()
        assert wait_until(lambda: server.version == 5)
        assert client.predict(images(1)).model_version == 5


def nan_model(path: Path) -> Path:
    """A model with the right signature whose outputs are NaN: it loads, but its warm-up must fail."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["m"], axes=[1, 2], keepdims=0),  # (N, 3)
        helper.make_node("Sub", ["m", "m"], ["zero"]),
        helper.make_node("Div", ["zero", "zero"], ["logits"]),  # 0 / 0
        helper.make_node("Identity", ["logits"], ["probs"]),
    ]
    graph = helper.make_graph(
        nodes,
        "nan",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["N", len(CLASSES)]) for name in ("logits", "probs")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 7  # not the installed onnx's newest: onnxruntime may read only older IR versions
    onnx.save(model, str(path))
    return path


def test_version_failing_warm_up_is_refused(repo, onnx_models, tmp_path, caplog):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section(poll_s=3600)) as server, InferenceClient(server.endpoint) as client:
        publish(repo, nan_model(tmp_path / "nan.onnx"))
        server.check_now()
        assert wait_until(lambda: server.counters["swap_failures"] == 1)
        assert "not finite" in caplog.text
        assert server.version == 1 and client.predict(images(1)).model_version == 1


def test_announcement_triggers_swap_without_polling(repo, onnx_models):
    publish(repo, onnx_models[0])
    announcer = Announcer("tcp://127.0.0.1:*")
    try:
        with Server(repo, serve_section(poll_s=3600), announce_endpoint=announcer.endpoint) as server:
            v2 = publish(repo, onnx_models[1])
            sha = repo.load_manifest(v2)["sha256"]
            # PUB drops messages until the SUB connection is up: announce until the server moves.
            assert wait_until(lambda: announcer.announce("student", v2, sha) or server.version == v2, timeout_s=10)
    finally:
        announcer.close()


def test_rollback_moves_the_server_to_the_old_model(repo, onnx_models):
    publish(repo, onnx_models[0])
    publish(repo, onnx_models[1])
    with Server(repo, serve_section()) as server:
        assert server.version == 2
        v3 = repo.rollback(1)
        assert wait_until(lambda: server.version == v3)
        assert server._model.sha256 == repo.load_manifest(1)["sha256"]
        # The replaced sessions are freed by the watcher once no batch holds them.
        assert wait_until(lambda: server._retired == [])


def test_requests_sent_during_swaps_all_get_answers(repo, onnx_models):
    publish(repo, onnx_models[0])
    answers: list[list[int]] = [[] for _ in range(3)]
    failures: list[Exception] = []
    stop = threading.Event()

    def load(i: int, endpoint: str) -> None:
        with InferenceClient(endpoint, timeout_s=5, retries=0) as client:
            while not stop.is_set():
                try:
                    answers[i].append(client.predict(images(1 + i, seed=i)).model_version)
                except Exception as e:  # any failure fails the test below
                    failures.append(e)

    with Server(repo, serve_section(poll_s=0.02, max_wait_ms=1)) as server:
        threads = [threading.Thread(target=load, args=(i, server.endpoint)) for i in range(3)]
        for t in threads:
            t.start()
        for k in range(4):
            version = publish(repo, onnx_models[k % 2])
            assert wait_until(lambda: server.version == version)
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join()
    assert failures == []
    assert server.counters["swaps"] == 5 and server.counters["swap_failures"] == 0
    for seen in answers:
        assert len(seen) > 5 and seen == sorted(seen)  # each client only ever moves forward
    assert max(max(seen) for seen in answers) == 5


def test_client_times_out_and_retries_against_a_silent_endpoint():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = InferenceClient(f"tcp://127.0.0.1:{port}", timeout_s=0.1, retries=2)
    started = time.monotonic()
    with pytest.raises(InferenceError, match="3 attempts") as info:
        client.predict(images(1))
    # three attempts of 0.1 s; the upper bound only catches retries without end (loose: the machine may be loaded)
    assert info.value.reason == "timeout" and 0.25 < time.monotonic() - started < 10
    client.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_answers_and_exits_cleanly_on_sigterm(repo, onnx_models):
    publish(repo, onnx_models[0])
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    metrics_port = free_port()
    command = [
        sys.executable, "-m", "cl_agent.cli", "serve", "--repo", str(repo.root), "--model", "student",
        "--set", f"serve.endpoint={endpoint}", "--set", f"repository.announce_endpoint=tcp://127.0.0.1:{free_port()}",
        "--set", f"serve.metrics_port={metrics_port}",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        with InferenceClient(endpoint, timeout_s=5, retries=12) as client:
            for _ in range(3):
                assert client.predict(images(2)).model_version == 1
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            lines = response.read().decode().splitlines()
        assert 'cl_agent_serve_version{model="student"} 1.0' in lines
        assert "cl_agent_serve_images_total 6.0" in lines and "cl_agent_serve_swaps_total 1.0" in lines
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output.decode()
    assert b"stopping" in output


def test_server_metrics_are_read_from_the_server_at_each_scrape(repo, onnx_models):
    from cl_agent.metrics import SERVE_METRICS, ServerMetrics

    publish(repo, onnx_models[0])
    with Server(repo, serve_section()) as server, InferenceClient(server.endpoint) as client:
        metrics = ServerMetrics(server)
        assert metrics.value("serve_version", model="student") == 1 and metrics.value("serve_images_total") == 0
        assert math.isnan(metrics.value("serve_batch_seconds", part="inference", quantile="0.5"))  # no batch yet
        client.predict(images(3))
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(server.endpoint)
        dealer.send_multipart(encode_message("infer", "x", 7, []))  # no images: an error reply
        assert decode_message(dealer.recv_multipart(), server.wire).header["reason"] == "no_images"
        dealer.close(0)
        publish(repo, onnx_models[1])
        assert wait_until(lambda: metrics.value("serve_version", model="student") == 2)
        assert metrics.value("serve_images_total") == 3 and metrics.value("serve_largest_batch") == 3
        assert metrics.value("serve_requests_total") == 2 and metrics.value("serve_errors_total") == 1
        assert metrics.value("serve_swaps_total") == 2 and metrics.value("serve_swap_failures_total") == 0
        assert 0 < metrics.value("serve_inference_seconds_total") < metrics.value("serve_busy_seconds_total")
        p50 = metrics.value("serve_batch_seconds", part="inference", quantile="0.5")
        assert p50 == pytest.approx(server.stats()["inference_ms_p50"] / 1000)
        assert p50 <= metrics.value("serve_batch_seconds", part="inference", quantile="0.99")
        text = generate_latest(metrics.registry).decode()
        for name, (kind, *_) in SERVE_METRICS.items():
            assert f"# TYPE cl_agent_{name} {kind}" in text


def test_unknown_provider_is_refused_at_start(repo):
    with pytest.raises(CLAgentError, match="NoSuchExecutionProvider"):
        Server(repo, serve_section(providers=["NoSuchExecutionProvider"]))


def test_busy_polling_starts_only_after_short_gaps_and_stops_after_long_ones():
    from cl_agent.server import _IdleGaps

    idle = _IdleGaps(window_s=0.001)
    now = 100.0
    idle.finished(now)
    assert idle.spin_until() == 0.0  # nothing seen yet: sleep
    for _ in range(10):  # a client that sends its next request 0.2 ms after each answer
        now += 0.0002
        idle.arrived(now)
        now += 0.001  # the batch
        idle.finished(now)
    assert idle.spin_until() == pytest.approx(now + 0.001)
    for _ in range(10):  # then requests 4 ms apart (an open-loop camera stream): spinning would only burn CPU
        now += 0.004
        idle.arrived(now)
        now += 0.001
        idle.finished(now)
    assert idle.spin_until() == 0.0
    assert _IdleGaps(window_s=0.0).spin_until() == 0.0


@pytest.mark.parametrize("busy_poll_us", [0, 50_000])
def test_back_to_back_requests_are_answered_with_and_without_busy_polling(repo, onnx_models, busy_poll_us):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section(busy_poll_us=busy_poll_us)) as server, InferenceClient(server.endpoint, timeout_s=5) as client:
        for k in range(30):
            assert client.predict(images(1, seed=k)).model_version == 1
        time.sleep(0.2)  # a pause longer than the window, then more
        assert len(client.predict(images(2)).predictions) == 2
        assert server.counters["requests"] == 31 and server.counters["errors"] == 0
        # With a window (50 ms: wide enough for a loaded machine), back-to-back requests are found by
        # the spinning thread; without one, never. How many depends on the machine's load.
        assert (server.counters["busy_poll_hits"] > 0) == (busy_poll_us > 0)


def test_raw_images_at_model_size_give_the_same_answers_as_decoded_ones(repo, onnx_models):
    """Raw RGB at the model's size takes the no-decode path; PNG (lossless) and raw BGR take the decoding one."""
    publish(repo, onnx_models[0])
    batch = images(3, seed=7)
    with Server(repo, serve_section()) as server, InferenceClient(server.endpoint, timeout_s=5) as raw:
        fast = raw.predict(batch, top_k=3).predictions
        with InferenceClient(server.endpoint, timeout_s=5, encoding="png") as png:
            assert png.predict(batch, top_k=3).predictions == fast
        bgr = [np.ascontiguousarray(image[:, :, ::-1]).tobytes() for image in batch]
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(server.endpoint)
        for color in ("bgr", "rgb"):  # declared BGR: converted back, same answers; the same bytes read as RGB: not
            dealer.send_multipart(pack_message("infer", "x", 1, bgr, encoding="raw", shapes=[(SIZE, SIZE, 3)] * 3, color=color, top_k=3))
            answer = decode_message(dealer.recv_multipart(), server.wire).header["predictions"]
            assert (answer == [[list(pair) for pair in row] for row in fast]) == (color == "bgr")
        dealer.close(0)


def test_client_that_spins_for_its_reply_gets_the_same_answers(repo, onnx_models):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section()) as server:
        with InferenceClient(server.endpoint, timeout_s=5) as sleeping, InferenceClient(server.endpoint, timeout_s=5, spin_us=500_000) as spinning:
            for k in range(5):
                assert spinning.predict(images(1, seed=k)).predictions == sleeping.predict(images(1, seed=k)).predictions
        # A tiny model answers well within half a second: every reply was found spinning; never without spinning.
        assert spinning.spin_hits == 5 and sleeping.spin_hits == 0

    with pytest.raises(CLAgentError, match="spin_us"):
        InferenceClient("tcp://127.0.0.1:1", spin_us=-1)


def test_optimised_graph_is_opened_when_made_here_and_model_onnx_otherwise(tmp_path, caplog):
    from cl_agent.repository import OPTIMIZED_DATA_FILE, OPTIMIZED_FILE, OptimizedModel
    from cl_agent.session import load_model, runtime_environment

    plain, optimized = tmp_path / "t.onnx", tmp_path / "opt" / OPTIMIZED_FILE
    export_onnx([tiny_net(0)], plain, image_size=SIZE, mean=[0.5] * 3, std=[0.25] * 3, export=ExportSection(), optimized_path=optimized)
    here = runtime_environment()
    manifest = {"class_names": CLASSES, "image_size": SIZE}
    repo = ModelRepository(tmp_path / "models", "student", keep_last=10)
    v_here = repo.publish(plain, manifest, OptimizedModel(optimized, here))
    v_elsewhere = repo.publish(plain, manifest, OptimizedModel(optimized, {**here, "isa": ["another-cpu"]}))
    v_damaged = repo.publish(plain, manifest, OptimizedModel(optimized, here))
    (repo.version_dir(v_damaged) / OPTIMIZED_FILE).write_bytes(b"not a graph")
    v_bad_weights = repo.publish(plain, manifest, OptimizedModel(optimized, here))
    weights = repo.version_dir(v_bad_weights) / OPTIMIZED_DATA_FILE
    weights.write_bytes(bytes(weights.stat().st_size))  # same size, zeroed: only the sha256 can tell
    v_missing = repo.publish(plain, manifest, OptimizedModel(optimized, here))
    (repo.version_dir(v_missing) / OPTIMIZED_FILE).unlink()  # as on a follower, which installs model.onnx only
    v_plain = repo.publish(plain, manifest)
    section = serve_section(providers=["CPUExecutionProvider"])
    loaded = [load_model(repo, v, section) for v in (v_here, v_elsewhere, v_damaged, v_bad_weights, v_missing, v_plain)]
    assert [m.optimized for m in loaded] == [True, False, False, False, False, False]
    assert "not using its optimised graph" in caplog.text
    assert f"{OPTIMIZED_DATA_FILE}: sha256" in caplog.text
    batch = images(4)
    (expected,) = ort.InferenceSession(str(plain), providers=["CPUExecutionProvider"]).run(["probs"], {"images": batch})
    for model in loaded:
        np.testing.assert_allclose(model.probabilities(batch), expected, atol=1e-6)
    # The server reports which graph answers: the newest version here has none.
    with Server(repo, section) as server, InferenceClient(server.endpoint, timeout_s=5) as client:
        assert client.status()["model_optimized"] is False
        assert client.status()["model_providers"] == ["CPUExecutionProvider"]
        repo.rollback(v_here)  # republished with its optimised graph
        server.check_now()
        assert wait_until(lambda: client.status()["model_version"] == v_plain + 1)
        assert client.status()["model_optimized"] is True
        np.testing.assert_allclose([p for _, p in client.predict(batch[:1], top_k=3).predictions[0]], np.sort(expected[0])[::-1], atol=1e-6)


def test_provider_options_give_tensorrt_one_profile_up_to_max_batch_and_leave_the_others_alone():
    from cl_agent.session import provider_options

    cpu = provider_options(["CPUExecutionProvider"], 32, 16)
    assert cpu == ["CPUExecutionProvider"]
    trt, cuda, last = provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], 48, 16)
    name, options = trt
    assert name == "TensorrtExecutionProvider" and (cuda, last) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert options["trt_profile_min_shapes"] == options["trt_profile_opt_shapes"] == "images:1x48x48x3"
    assert options["trt_profile_max_shapes"] == "images:16x48x48x3"
    assert "trt_engine_cache_enable" not in options
    (_, cached), *_ = provider_options(["TensorrtExecutionProvider", "CPUExecutionProvider"], 32, 8, trt_cache_dir="engines")
    assert cached["trt_engine_cache_enable"] == "True" and cached["trt_engine_cache_path"] == "engines"


@pytest.mark.parametrize("classes", [10, 100])  # the plain-Python path and numpy's
def test_ranked_predictions_match_a_numpy_ranking_and_are_valid_json(classes):
    rng = np.random.default_rng(classes)
    probs = rng.random((4, classes), dtype=np.float32)
    probs[1, 3] = probs[1, 7] = 2.0  # a tie for first place: the lower index comes first
    probs[2, 0] = np.nan  # a broken model's output still gives JSON that parses
    names = [f"c{i}" for i in range(classes)]
    ranked = _ranked(probs, 5)
    for row, expected in zip(ranked[:2] + ranked[3:], probs[[0, 1, 3]]):
        order = np.argsort(-expected, kind="stable")[:5]
        assert [c for c, _ in row] == order.tolist()
        assert [p for _, p in row] == expected[order].tolist()
    assert [c for c, _ in ranked[1][:2]] == [3, 7]
    text = _predictions_json(ranked, 3, [json.dumps(n) for n in names])
    parsed = json.loads(text)
    assert len(parsed) == 4 and all(len(image) == 3 for image in parsed)
    assert parsed[0] == [[names[c], p] for c, p in ranked[0][:3]]


def test_client_raises_a_clear_error_on_a_malformed_prediction():
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def answer_without_predictions():
        frames = router.recv_multipart()
        seq = json.loads(frames[-2])["seq"]
        router.send_multipart(frames[:2] + pack_message("prediction", "server", seq, model_version=1))

    thread = threading.Thread(target=answer_without_predictions, daemon=True)
    thread.start()
    with InferenceClient(f"tcp://127.0.0.1:{port}", timeout_s=5, retries=0) as client:
        with pytest.raises(InferenceError) as info:
            client.predict(images(1))
    assert info.value.reason == "bad_reply" and "predictions" in info.value.detail
    thread.join(5)
    router.close()


class _ReplyAt:
    """A socket whose reply lands at ``ready_at`` on a fake clock (also the inference module's perf_counter).

    poll(ms) sleeps until the reply or the timeout, whichever comes first; poll(0) costs 10 us of spinning.
    """

    def __init__(self, ready_at: float):
        self.now, self.ready_at, self.sleeps, self.spun_s = 0.0, ready_at, [], 0.0

    def perf_counter(self) -> float:
        return self.now

    def poll(self, timeout_ms: int = 0) -> bool:
        if self.now >= self.ready_at:
            return True
        if timeout_ms == 0:
            self.now += 1e-5
            self.spun_s += 1e-5
            return False
        self.sleeps.append((round(self.now, 6), timeout_ms))
        self.now = min(self.ready_at, self.now + timeout_ms / 1000)
        return self.now >= self.ready_at

    def __getattr__(self, name):  # the rest of the time module
        return getattr(time, name)


@pytest.mark.parametrize(
    "due_s, reply_s, slept, spin_hit",
    [
        (None, 0.010, [], True),  # round trip unknown: spins from the send
        (0.060, 0.060, [(0.0, 40)], True),  # due at 60 ms, window 40 ms: sleeps 40 ms, spins 40..80 ms, finds it
        (0.060, 0.010, [(0.0, 40)], False),  # early reply: the sleeping poll wakes for it, no spin
        (0.010, 0.015, [], True),  # due sooner than half the window: spins from the send
        (0.060, 0.500, [(0.0, 40), (0.08, 4920)], False),  # late reply: spins to 80 ms only, then sleeps the rest
        (0.060, 99.0, [(0.0, 40), (0.08, 4920)], False),  # no reply: False after the timeout, not before
    ],
)
def test_spinning_client_window_arithmetic(monkeypatch, due_s, reply_s, slept, spin_hit):
    import cl_agent.inference as inference_module

    socket = _ReplyAt(reply_s)
    monkeypatch.setattr(inference_module, "time", socket)
    client = InferenceClient("tcp://127.0.0.1:1", timeout_s=5, spin_us=40_000)
    answered = client._wait_for_reply(socket, 0.0, due_s)
    assert answered == (reply_s < 5)
    assert len(socket.sleeps) == len(slept), socket.sleeps
    for (at_s, ms), (expected_at_s, expected_ms) in zip(socket.sleeps, slept):  # poll counts whole milliseconds
        assert at_s == pytest.approx(expected_at_s, abs=1e-3) and abs(ms - expected_ms) <= 1, socket.sleeps
    assert client.spin_hits == int(spin_hit)
    if answered:
        assert socket.now == pytest.approx(reply_s, abs=1e-4)  # never later than the reply
    assert socket.spun_s <= 0.040 + 0.0011  # at most one window of spinning (+ the sleep's truncated millisecond)


def test_spinning_client_learns_the_round_trip_and_gets_its_answers():
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    delay_s, answered = 0.06, []

    def slow_server():
        while len(answered) < 6:
            frames = router.recv_multipart()
            time.sleep(delay_s)
            seq = json.loads(frames[-2])["seq"]
            router.send_multipart(frames[:2] + pack_message("prediction", "server", seq, model_version=1, predictions=[[["a", 1.0]]]))
            answered.append(seq)

    thread = threading.Thread(target=slow_server, daemon=True)
    thread.start()
    with InferenceClient(f"tcp://127.0.0.1:{port}", timeout_s=10, retries=0, spin_us=40_000) as client:
        for _ in range(6):
            assert client.predict(images(1)).labels == ["a"]
        # every round trip took at least the server's delay, so their moving average did too
        assert client._round_trip_s[1] >= delay_s
    thread.join(5)
    router.close()


def test_oversized_message_is_dropped_unread_and_server_keeps_answering(repo, onnx_models):
    from cl_agent.config import WireSection

    publish(repo, onnx_models[0])
    wire = WireSection(max_message_bytes=200_000, max_part_bytes=4_000_000)
    with Server(repo, serve_section(), wire=wire) as server:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(server.endpoint)
        big = encode_message("infer", "big", 7, [np.zeros((300, 300, 3), np.uint8)], encoding="raw")  # 270 KB image part
        dealer.send_multipart(big)
        # ZeroMQ drops the connection at the frame's size, before reading it: no reply, nothing counted.
        assert not dealer.poll(500)
        assert server.counters["requests"] == 0
        dealer.close(0)
        with InferenceClient(server.endpoint, timeout_s=5) as client:
            assert client.predict(images(1)).model_version == 1


class _BatchSizes:
    """Stands in for an onnxruntime session: runs the real one, records each batch size it is given."""

    def __init__(self, session):
        self.session, self.sizes = session, []

    def run(self, names, feeds):
        self.sizes.append(len(feeds["images"]))
        return self.session.run(names, feeds)


def test_no_session_run_exceeds_max_batch_and_large_requests_are_chunked(repo, onnx_models):
    publish(repo, onnx_models[0])
    reference = ort.InferenceSession(str(onnx_models[0]), providers=["CPUExecutionProvider"])
    with Server(repo, serve_section(max_batch=4, max_wait_ms=20)) as server:
        recorder = _BatchSizes(server._model.session)
        server._model.session = recorder
        batch = images(10, seed=3)
        (expected,) = reference.run(["probs"], {"images": batch})
        with InferenceClient(server.endpoint, timeout_s=5) as client:
            result = client.predict(batch, top_k=3)
        assert len(result.predictions) == 10
        for row, prediction in zip(expected, result.predictions):
            best = np.argsort(-row)[:3]
            assert [name for name, _ in prediction] == [CLASSES[i] for i in best]
            np.testing.assert_allclose([p for _, p in prediction], row[best], atol=1e-5)
        # Pipelined requests of 3 images: two never share a batch of 4; none is lost.
        replies = pipelined(server, 6, 3)
        assert sorted(r.seq for r in replies) == list(range(6))
        assert all(r.kind == "prediction" and len(r.header["predictions"]) == 3 for r in replies)
    assert max(recorder.sizes) <= 4 and sum(recorder.sizes) == 10 + 18
    assert server.counters["largest_batch"] == 4 and server.counters["images"] == 28


def test_error_reply_carries_the_request_seq_when_the_header_is_readable(repo, onnx_models):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section()) as server:
        dealer = zmq.Context.instance().socket(zmq.DEALER)
        dealer.connect(server.endpoint)
        frames = encode_message("infer", "t", 4242, list(images(1)), encoding="raw")
        dealer.send_multipart([frames[0], frames[1][:10]])  # the header declares 16x16x3, the payload is 10 bytes
        error = decode_message(dealer.recv_multipart(), server.wire)
        dealer.send_multipart([b"not json"])
        unreadable = decode_message(dealer.recv_multipart(), server.wire)
        dealer.close(0)
    assert error.kind == "error" and error.seq == 4242
    assert unreadable.kind == "error" and unreadable.header["reason"] == "bad_json" and unreadable.seq == 0


def test_a_reset_repository_is_warned_about_once_and_not_served(repo, onnx_models, caplog):
    publish(repo, onnx_models[0])
    publish(repo, onnx_models[1])
    publish(repo, onnx_models[0])
    with Server(repo, serve_section(poll_s=3600)) as server:
        assert server.version == 3
        shutil.rmtree(repo.version_dir(3))
        shutil.rmtree(repo.version_dir(2))  # as if the repository were reset: the newest is now 1
        for _ in range(3):
            checked(server)
        assert "restart" in caplog.text
        assert server.version == 3
    warnings = [r.getMessage() for r in caplog.records if "restart" in r.getMessage()]
    assert len(warnings) == 1
    assert "served version 3" in warnings[0] and "is 1" in warnings[0]


def test_a_refused_version_fixed_in_place_is_loaded(repo, onnx_models):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section(poll_s=3600)) as server:
        v2 = publish(repo, onnx_models[1])
        path = repo.model_path(v2)
        good = path.read_bytes()
        data = bytearray(good)
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        server.check_now()
        assert wait_until(lambda: server.counters["swap_failures"] == 1)
        checked(server)
        assert server.version == 1 and server.counters["swap_failures"] == 1  # not retried as it is
        path.write_bytes(good)  # same version number and manifest, the file rewritten
        st = path.stat()
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # coarse clocks: a surely new mtime
        server.check_now()
        assert wait_until(lambda: server.version == v2)


def test_a_malformed_manifest_is_warned_about_and_counted_once(repo, onnx_models, caplog):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section(poll_s=3600)) as server, InferenceClient(server.endpoint) as client:
        folder = repo.model_dir / "2"
        folder.mkdir()
        shutil.copy(onnx_models[1], folder / "model.onnx")
        (folder / "manifest.json").write_text("{garbage")
        for _ in range(3):
            checked(server)
        assert server.counters["swap_failures"] == 1
        assert server.version == 1 and client.predict(images(1)).model_version == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "manifest.json" in r.getMessage()]
    assert len(warnings) == 1 and "not valid JSON" in warnings[0]


def test_a_manifest_missing_a_field_is_refused_naming_the_field(repo, onnx_models, caplog):
    publish(repo, onnx_models[0])
    with Server(repo, serve_section(poll_s=3600)) as server, InferenceClient(server.endpoint) as client:
        folder = repo.model_dir / "2"
        folder.mkdir()
        shutil.copy(onnx_models[1], folder / "model.onnx")  # copied in by hand, with a partial manifest
        (folder / "manifest.json").write_text(json.dumps({"version": 2, "class_names": CLASSES, "image_size": SIZE}))
        server.check_now()
        assert wait_until(lambda: server.counters["swap_failures"] == 1)
        assert server.version == 1 and client.predict(images(1)).model_version == 1
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR" and "version 2" in r.getMessage()]
    assert len(errors) == 1 and "manifest is missing sha256" in errors[0]


def test_a_taken_endpoint_fails_before_any_model_is_loaded(repo, onnx_models):

    publish(repo, onnx_models[0])
    taken = zmq.Context.instance().socket(zmq.ROUTER)
    port = taken.bind_to_random_port("tcp://127.0.0.1")
    server = Server(repo, serve_section(endpoint=f"tcp://127.0.0.1:{port}"))
    try:
        with pytest.raises(CLAgentError, match="cannot bind serve.endpoint"):
            server.start()
        assert server.version is None and server.counters["swaps"] == 0  # refused without loading version 1
    finally:
        taken.close(0)


def test_the_no_model_warning_says_what_is_wrong_with_repo_or_model(tmp_path, onnx_models):
    from cl_agent.server import _why_no_model

    missing = ModelRepository(tmp_path / "nowhere", "student")
    assert "repository folder" in _why_no_model(missing) and "does not exist" in _why_no_model(missing)
    publish(ModelRepository(tmp_path / "models", "student"), onnx_models[0])
    wrong = ModelRepository(tmp_path / "models", "studnet")
    assert _why_no_model(wrong) == f"no model 'studnet' in {tmp_path / 'models'} (models there: student)"
    (tmp_path / "models" / "empty").mkdir()
    assert "no complete version of 'empty'" in _why_no_model(ModelRepository(tmp_path / "models", "empty"))


def test_a_new_version_is_loaded_against_the_manifest_read_once(repo, onnx_models):
    """The watcher reads a new version's manifest once: the refusal key and the sha256 check use the same read."""
    publish(repo, onnx_models[0])
    reads: list[int] = []
    load_manifest = repo.load_manifest

    def counting(version: int) -> dict:
        reads.append(version)
        return load_manifest(version)

    repo.load_manifest = counting
    with Server(repo, serve_section(poll_s=3600)) as server:
        assert server.version == 1 and reads == [1]
        publish(repo, onnx_models[1])
        server.check_now()
        assert wait_until(lambda: server.version == 2)
        assert reads == [1, 2]


def test_classes_never_trained_on_are_left_out_of_every_clients_top_k(tmp_path):
    # The exported graph masks never-trained outputs (probability exactly 0): a Python client asking for the
    # default top_k (5, more than the 3 outputs) gets the 2 trained classes, not a placeholder at 0.0.
    from cl_agent.student import SeenClassMask

    model = tmp_path / "masked.onnx"
    masked = SeenClassMask(tiny_net(0), torch.tensor([True, False, True])).eval()
    export_onnx([masked], model, image_size=SIZE, mean=[0.5] * 3, std=[0.25] * 3, export=ExportSection())
    repo = ModelRepository(tmp_path / "models", "student")
    publish(repo, model)
    with Server(repo, serve_section()) as server, InferenceClient(server.endpoint, timeout_s=5) as client:
        result = client.predict(images(2))
    for row in result.predictions:
        assert sorted(name for name, _ in row) == ["cat", "cup"] and all(p > 0 for _, p in row)


def test_only_exact_zeros_are_left_out_and_a_row_is_never_empty():
    names = [json.dumps(n) for n in ("a", "b", "c")]
    ranked = [[(0, 0.7), (1, 0.3), (2, 0.0)], [(2, float("nan")), (0, 0.0), (1, 0.0)], [(0, 0.0), (1, 0.0), (2, 0.0)]]
    parsed = json.loads(_predictions_json(ranked, 3, names))
    assert parsed[0] == [["a", 0.7], ["b", 0.3]]
    assert [name for name, _ in parsed[1]] == ["c"]  # a broken model's NaN stays visible
    assert parsed[2] == [["a", 0.0]]
