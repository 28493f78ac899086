"""A client pointed at another of the agent's ports says which endpoint answered and which key names the right one."""

from __future__ import annotations

import logging

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from ingest_support import make_service, wait_until

from cl_agent.cli import app
from cl_agent.config import ServeSection
from cl_agent.fetch import FetchClient, FetchError, ModelFetchService
from cl_agent.follower import RepositoryFollower
from cl_agent.inference import InferenceClient, InferenceError
from cl_agent.repository import ModelRepository
from cl_agent.server import Server


@pytest.fixture
def ingest(tmp_path):
    with make_service(tmp_path / "agent") as service:
        yield service


def test_predict_at_the_labeled_port_names_it_and_serve_endpoint(ingest, tmp_path):
    for name in ("a.jpg", "b.jpg"):
        cv2.imwrite(str(tmp_path / name), np.full((12, 12, 3), 90, np.uint8))
    result = CliRunner().invoke(
        app, ["predict", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "--endpoint", ingest.endpoints["labeled"]]
    )
    assert result.exit_code == 1, result.output
    said = result.output
    assert said.count("answers as") == 1, said  # one error for the command, not one per image
    assert f"{ingest.endpoints['labeled']} answered with 'nack' (unexpected_kind: kind 'infer' on the labeled socket)" in said
    assert "the agent's labeled endpoint (ingest.labeled_endpoint" in said
    assert "serve.endpoint (default port 5558)" in said


def test_predict_status_at_the_control_port_names_it(ingest):
    with InferenceClient(ingest.endpoints["control"], timeout_s=2.0, retries=0) as client:
        with pytest.raises(InferenceError) as info:
            client.status()
    assert info.value.reason == "wrong_endpoint"
    assert "the agent's control endpoint (ingest.control_endpoint" in str(info.value)


def test_fetch_at_the_labeled_port_names_it_and_fetch_endpoint(ingest):
    client = FetchClient(ingest.endpoints["labeled"], "student", timeout_s=2.0, retries=0)
    with pytest.raises(FetchError) as info:
        client.list_versions()
    client.close()
    assert info.value.reason == "wrong_endpoint"
    assert "answers as the agent's labeled endpoint" in str(info.value)
    assert "repository.fetch_endpoint (default port 5560)" in str(info.value)


def test_fetch_at_a_server_and_predict_at_the_fetch_port_name_each_other(tmp_path):
    repository = ModelRepository(tmp_path / "models", "student")
    with Server(repository, ServeSection(endpoint="tcp://127.0.0.1:*")) as server:
        client = FetchClient(server.endpoint, "student", timeout_s=2.0, retries=0)
        with pytest.raises(FetchError, match=r"answers as a server's inference endpoint \(serve.endpoint"):
            client.list_versions()
        client.close()
    with ModelFetchService(repository, "tcp://127.0.0.1:*") as service:
        with InferenceClient(service.endpoint, timeout_s=2.0, retries=0) as inference:
            with pytest.raises(InferenceError, match=r"answers as the agent's fetch endpoint .* serve.endpoint \(default port 5558\)"):
                inference.predict(np.zeros((1, 8, 8, 3), np.uint8))


def test_a_follower_of_the_labeled_port_logs_the_same_error_once(ingest, tmp_path, caplog):
    follower = RepositoryFollower(
        ingest.endpoints["labeled"], None, ModelRepository(tmp_path / "edge", "student"), poll_s=0.05, retry_s=0.01, timeout_s=2.0
    )
    with caplog.at_level(logging.INFO, logger="cl_agent.follower"):
        with follower:
            assert wait_until(lambda: follower.counters["fetch_errors"] >= 5, 10)
    failures = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 1, failures
    assert "answers as the agent's labeled endpoint" in failures[0] and "repository.fetch_endpoint" in failures[0]


def test_a_repeated_failure_is_logged_again_after_silent_repeat_s(tmp_path, caplog):
    follower = RepositoryFollower("tcp://127.0.0.1:9", None, ModelRepository(tmp_path, "student"), silent_repeat_s=60.0)
    error = FetchError("wrong_endpoint", "tcp://127.0.0.1:9 answers as something else")
    with caplog.at_level(logging.WARNING, logger="cl_agent.follower"):
        assert follower.report_failure(error, 5.0, now=100.0)
        assert not follower.report_failure(error, 5.0, now=105.0)
        assert not follower.report_failure(error, 5.0, now=159.0)
        assert follower.report_failure(error, 5.0, now=161.0)
        assert follower.report_failure(FetchError("timeout", "other"), 5.0, now=162.0)  # a different error: at once
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 3 and "the same error 2 more times" in messages[1]
    follower.client.close()


def test_serve_follow_at_the_labeled_port_says_so_once_and_names_its_announce_endpoint(ingest, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from ingest_support import free_port

    command = [
        sys.executable, "-m", "cl_agent", "serve", "--repo", str(tmp_path / "edge"), "--model", "student",
        "--follow", ingest.endpoints["labeled"], "--set", f"serve.endpoint=tcp://127.0.0.1:{free_port()}",
        "--set", "serve.follow_poll_s=0.1", "--set", "metrics.enabled=false",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert wait_until(lambda: ingest.counters()["labeled_nacked"] >= 6, 30), "the follower never asked"
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=15)[0]
    host = ingest.endpoints["labeled"].rsplit(":", 1)[0]
    assert f"announcements from {host}:5557" in output, output[-3000:]  # its own default port, said at start
    assert output.count("answers as the agent's labeled endpoint") == 1, output[-3000:]
    assert "repository.fetch_endpoint (default port 5560)" in output
