"""Servers on other machines: a fetch service, followers mirroring it, real servers hot-swapping on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ingest_support import wait_until

from cl_agent.config import CurveSection, ServeSection
from cl_agent.errors import CLAgentError
from cl_agent.fetch import FetchClient, FetchError, ModelFetchService
from cl_agent.follower import RepositoryFollower, derived_announce_endpoint
from cl_agent.inference import InferenceClient, InferenceError
from cl_agent.repository import Announcer, ModelRepository, sha256_file
from cl_agent.security import make_keypair
from cl_agent.server import Server
from cl_agent.transfer import download

CLASSES = ["cat", "dog", "cup"]
SIZE = 8


def tiny_onnx(path: Path, seed: int) -> Path:
    """images uint8 (N, S, S, 3) -> mean colour (N, 3) -> linear -> logits, probs (N, K); built directly, no export."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = np.random.default_rng(seed).normal(size=(3, len(CLASSES))).astype(np.float32) / 64
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "axes"], ["colour"], keepdims=0),  # (N, 3)
        helper.make_node("MatMul", ["colour", "weights"], ["logits"]),  # (N, K)
        helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", SIZE, SIZE, 3])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", len(CLASSES)]),
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", len(CLASSES)]),
        ],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(np.array([1, 2], np.int64), "axes")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("onnx")
    return [tiny_onnx(folder / f"tiny{i}.onnx", i) for i in range(6)]


@pytest.fixture
def source(tmp_path) -> ModelRepository:
    return ModelRepository(tmp_path / "agent-models", "student", keep_last=3)


def publish(repo: ModelRepository, path: Path) -> int:
    return repo.publish(path, {"class_names": CLASSES, "image_size": SIZE})


def answered_version(endpoint: str) -> int | None:
    """The version a real inference request is answered with (None while the server has none)."""
    with InferenceClient(endpoint, timeout_s=2.0, retries=1) as client:
        try:
            return client.predict(np.zeros((1, SIZE, SIZE, 3), np.uint8)).model_version
        except InferenceError as e:
            assert e.reason == "no_model", e
            return None


class Edge:
    """One remote server: its own repository folder, a follower into it and a Server on it."""

    def __init__(self, folder: Path, fetch_endpoint: str, announce_endpoint: str | None, **follower_options):
        self.repository = ModelRepository(folder, "student", keep_last=2)
        self.server = Server(self.repository, ServeSection(endpoint="tcp://127.0.0.1:*", poll_s=30.0, max_batch=4))
        options = {"poll_s": 30.0, "retry_s": 0.1, "timeout_s": 2.0, **follower_options}
        self.follower = RepositoryFollower(
            fetch_endpoint, announce_endpoint, self.repository, on_install=lambda _: self.server.check_now(), **options
        )

    def __enter__(self) -> "Edge":
        self.follower.start()
        self.server.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()
        self.follower.stop()

    def answers(self, version: int, timeout_s: float = 10.0) -> bool:
        return wait_until(lambda: answered_version(self.server.endpoint) == version, timeout_s)


def test_two_servers_move_to_each_new_version(tmp_path, source, models):
    publish(source, models[0])
    announcer = Announcer("tcp://127.0.0.1:*")
    try:
        with ModelFetchService(source, "tcp://127.0.0.1:*") as service:
            # poll_s is 30 s: after the start-up catch-up, only announcements move them this fast.
            with Edge(tmp_path / "edge-a", service.endpoint, announcer.endpoint) as a, Edge(
                tmp_path / "edge-b", service.endpoint, announcer.endpoint
            ) as b:
                assert a.answers(1) and b.answers(1)
                for model in models[1:3]:
                    version = publish(source, model)
                    announcer.announce("student", version, source.load_manifest(version)["sha256"])
                    assert a.answers(version) and b.answers(version), f"version {version} not served by both"
                for edge in (a, b):
                    # Same number, same bytes, same manifest as the agent's.
                    assert edge.repository.versions() == [2, 3]
                    assert edge.repository.load_manifest(3) == source.load_manifest(3)
                    assert sha256_file(edge.repository.model_path(3)) == source.load_manifest(3)["sha256"]
                    assert edge.follower.counters["installs"] == 3 and edge.follower.counters["announcements"] >= 2
                    assert edge.server.counters["swap_failures"] == 0
                    assert not list(edge.repository.model_dir.glob(".fetch-*")), "partial download left behind"
            assert service.counters["errors"] == 0
    finally:
        announcer.close()


def test_a_server_started_late_catches_up_to_the_newest(tmp_path, source, models):
    with ModelFetchService(source, "tcp://127.0.0.1:*") as service:
        for model in models[:4]:
            publish(source, model)  # 1..4; retention on the agent keeps 2..4
        with Edge(tmp_path / "edge", service.endpoint, None) as edge:
            assert edge.answers(4)
            assert edge.repository.versions() == [4], "catching up installs the newest, not every version in between"
        # Offline while the agent publishes two more; on restart it catches up from its own repository.
        publish(source, models[4])
        publish(source, models[5])
        with Edge(tmp_path / "edge", service.endpoint, None) as edge:
            assert edge.server.version in (None, 4)
            assert edge.answers(6)
            assert edge.repository.versions() == [4, 6] and edge.repository.last_version_ever() == 6


class CorruptingService(ModelFetchService):
    """Flips one byte of the first ``bad_chunks`` model chunks it sends (a transfer damaged on the way)."""

    bad_chunks = 1

    def answer(self, parts):
        reply_parts = super().answer(parts)
        if len(reply_parts) == 2 and self.bad_chunks > 0 and reply_parts[1]:
            self.bad_chunks -= 1
            data = bytearray(reply_parts[1])
            data[len(data) // 2] ^= 0xFF
            reply_parts = [reply_parts[0], bytes(data)]
        return reply_parts


def test_a_corrupted_transfer_is_refused_and_retried(tmp_path, source, models):
    publish(source, models[0])
    with CorruptingService(source, "tcp://127.0.0.1:*", chunk_bytes=128) as service:
        with Edge(tmp_path / "edge", service.endpoint, None) as edge:
            assert edge.answers(1)
            assert edge.follower.counters["corrupt"] == 1 and edge.follower.counters["installs"] == 1
            assert edge.repository.verify(1)["sha256"] == source.load_manifest(1)["sha256"]


def test_a_tampered_source_file_is_never_installed_until_fixed(tmp_path, source, models):
    publish(source, models[0])
    with ModelFetchService(source, "tcp://127.0.0.1:*") as service:
        with Edge(tmp_path / "edge", service.endpoint, None, poll_s=0.2) as edge:
            assert edge.answers(1)
            version = publish(source, models[1])
            path = source.model_path(version)
            good = path.read_bytes()
            path.write_bytes(good[:-10])  # truncated on the agent's disk: its bytes no longer match the manifest
            assert wait_until(lambda: edge.follower.counters["corrupt"] >= 2)
            assert edge.repository.versions() == [1] and answered_version(edge.server.endpoint) == 1
            path.write_bytes(good)
            assert edge.answers(version)
            assert edge.server.counters["swap_failures"] == 0


def test_download_resumes_from_a_partial_file(tmp_path, source, models):
    publish(source, models[0])
    expected = source.model_path(1).read_bytes()
    manifest = source.load_manifest(1)
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / f".fetch-1-{manifest['sha256'][:16]}.part").write_bytes(expected[:300])  # an interrupted transfer
    (folder / ".fetch-9-0123456789abcdef.part").write_bytes(b"stale")  # another version's leftover
    with ModelFetchService(source, "tcp://127.0.0.1:*", chunk_bytes=100) as service:
        client = FetchClient(service.endpoint, "student", chunk_bytes=100)
        counters: dict = {}
        path = download(client, 1, client.manifest(1), folder, max_bytes=1 << 20, counters=counters)
        client.close()
    assert path.read_bytes() == expected
    assert counters["bytes"] == len(expected) - 300, "only the missing bytes travel"
    assert service.counters["chunks"] == -(-(len(expected) - 300) // 100)  # ceil: 100-byte chunks of the rest
    assert sorted(p.name for p in folder.iterdir()) == [path.name]


def test_bad_requests_get_error_replies(source, models):
    publish(source, models[0])
    with ModelFetchService(source, "tcp://127.0.0.1:*", chunk_bytes=64) as service:
        client = FetchClient(service.endpoint, "student", timeout_s=2.0)
        assert client.list_versions() == [1]
        header, data = client.chunk(1, 0)
        assert len(data) == 64 and header["size"] == source.model_path(1).stat().st_size
        for call, reason in [
            (lambda: client.manifest(7), "no_version"),
            (lambda: client.chunk(1, 10**9), "bad_offset"),
            (lambda: client._call("delete_everything", "x"), "bad_kind"),
            (lambda: FetchClient(service.endpoint, "other", timeout_s=2.0).list_versions(), "unknown_model"),
        ]:
            with pytest.raises(FetchError) as info:
                call()
            assert info.value.reason == reason
        assert client.list_versions() == [1]
        client.close()
    silent = FetchClient("tcp://127.0.0.1:1", "student", timeout_s=0.1, retries=1)
    with pytest.raises(FetchError, match="timeout"):
        silent.list_versions()
    silent.close()


def test_install_keeps_numbers_and_refuses_old_or_mismatched_versions(tmp_path, source, models):
    publish(source, models[0])
    publish(source, models[1])
    mirror = ModelRepository(tmp_path / "mirror", "student")
    assert mirror.install(2, source.model_path(2), source.load_manifest(2)) == 2
    assert mirror.versions() == [2] and mirror.verify(2) == source.load_manifest(2)
    assert (mirror.model_dir / "config.pbtxt").is_file()
    with pytest.raises(CLAgentError, match="already reached 2"):
        mirror.install(1, source.model_path(1), source.load_manifest(1))
    wrong = {**source.load_manifest(1), "version": 5}
    with pytest.raises(CLAgentError, match="sha256"):
        mirror.install(5, source.model_path(2), {**wrong, "sha256": "0" * 64})
    with pytest.raises(CLAgentError, match="does not describe version 6"):
        mirror.install(6, source.model_path(1), wrong)
    assert mirror.versions() == [2] and not list(mirror.model_dir.glob(".tmp-*"))
    assert publish(mirror, models[2]) == 3, "a local publish continues after the installed number"


def test_curve_follower_needs_an_authorized_key(tmp_path, source, models):
    publish(source, models[0])
    agent_public, agent_secret = make_keypair(tmp_path / "agent-keys", "agent")
    _, edge_secret = make_keypair(tmp_path / "authorized", "edge")
    _, rogue_secret = make_keypair(tmp_path / "rogue", "rogue")
    curve = CurveSection(enabled=True, server_secret_key=str(agent_secret), authorized_clients_dir=str(tmp_path / "authorized"))
    with ModelFetchService(source, "tcp://127.0.0.1:*", curve=curve) as service:
        rogue = FetchClient(service.endpoint, "student", timeout_s=0.3, retries=0, curve_secret_key=rogue_secret, curve_server_key=agent_public)
        with pytest.raises(FetchError, match="timeout"):
            rogue.list_versions()
        rogue.close()
        with Edge(tmp_path / "edge", service.endpoint, None, curve_secret_key=edge_secret, curve_server_key=agent_public) as edge:
            assert edge.answers(1)


def test_a_follower_of_an_unreachable_agent_stops_at_once(tmp_path):
    follower = RepositoryFollower(f"tcp://127.0.0.1:{free_port()}", None, ModelRepository(tmp_path, "student"), timeout_s=30.0)
    follower.start()
    assert wait_until(lambda: follower.counters["syncs"] == 1)
    time.sleep(0.1)  # inside its first request, waiting for a reply that will not come
    started = time.monotonic()
    follower.stop()
    assert time.monotonic() - started < 10  # not after its 30 s request timeout (nor stop's 15 s join limit)
    assert follower.counters["syncs"] == 1 and follower.counters["fetch_errors"] == 0


def test_derived_announce_endpoint():
    assert derived_announce_endpoint("tcp://agent.lan:5560", "tcp://127.0.0.1:5557") == "tcp://agent.lan:5557"
    assert derived_announce_endpoint("tcp://10.0.0.2:7000", "tcp://0.0.0.0:7001") == "tcp://10.0.0.2:7001"
    assert derived_announce_endpoint("ipc:///x", "tcp://127.0.0.1:5557") is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve_follow(tmp_path, source, models):
    publish(source, models[0])
    announcer = Announcer("tcp://127.0.0.1:*")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with ModelFetchService(source, "tcp://127.0.0.1:*") as service:
        command = [
            sys.executable, "-m", "cl_agent", "serve", "--repo", str(tmp_path / "edge"), "--model", "student",
            "--follow", service.endpoint, "--follow-announce", announcer.endpoint,
            "--set", f"serve.endpoint={endpoint}", "--set", "serve.follow_poll_s=30",
        ]  # fmt: skip
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            assert wait_until(lambda: answered_version(endpoint) == 1, 30), "the following server never served version 1"
            version = publish(source, models[1])
            announcer.announce("student", version, source.load_manifest(version)["sha256"])
            assert wait_until(lambda: answered_version(endpoint) == 2, 10)
            process.send_signal(signal.SIGTERM)
            assert process.wait(15) == 0
        finally:
            if process.poll() is None:
                process.kill()
            output = process.communicate()[0].decode()
            announcer.close()
    assert "following" in output, output[-2000:]
    assert ModelRepository(tmp_path / "edge", "student").versions() == [1, 2]


def test_the_agent_hosts_the_fetch_endpoint(tmp_path, models):
    from cl_agent.agent import Agent
    from cl_agent.demo import local_config

    cfg = local_config(tmp_path, "cpu")
    publish(ModelRepository(cfg.repository.root, cfg.agent.model_name), models[0])
    agent = Agent(cfg)
    agent._start_fetch_service()
    try:
        assert agent.fetch_service is not None and agent.fetch_service.endpoint == cfg.repository.fetch_endpoint
        client = FetchClient(cfg.repository.fetch_endpoint, cfg.agent.model_name, timeout_s=2.0)
        assert client.list_versions() == [1]
        client.close()
    finally:
        agent.fetch_service.stop()


def test_serve_follow_options_are_checked_like_the_config_keys(tmp_path):
    from typer.testing import CliRunner

    from cl_agent.cli import app

    for option, key in (("--follow", "serve.follow_fetch_endpoint"), ("--follow-announce", "serve.follow_announce_endpoint")):
        result = CliRunner().invoke(app, ["serve", "--repo", str(tmp_path), option, "nowhere"])
        said = f"{result.output} {result.exception}"  # the console entry point prints a ConfigError as one line
        assert result.exit_code != 0 and key in said and "expected an endpoint" in said, said
