"""`cl-agent serve` refuses a repository folder it can never use, a follower says when its agent is silent, and a
serve started with SIGINT ignored (a background job of a shell script) still stops cleanly on SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from ingest_support import wait_until

from cl_agent.errors import CLAgentError
from cl_agent.fetch import ModelFetchService
from cl_agent.follower import RepositoryFollower
from cl_agent.repository import ModelRepository
from cl_agent.server import check_repository_root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "cl_agent", "serve", "--set", f"serve.endpoint=tcp://127.0.0.1:{free_port()}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_serve_refuses_a_repo_that_is_a_file_with_one_line_and_exit_2(tmp_path):
    a_file = tmp_path / "passwd"
    a_file.write_text("root:x:0:0\n")
    done = serve("--repo", str(a_file))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"error: --repo = {str(a_file)!r}: exists and is not a folder"


def test_serve_refuses_a_repository_root_from_the_config_naming_the_key(tmp_path):
    a_file = tmp_path / "models"
    a_file.write_text("x")
    done = serve("--set", f"repository.root={a_file}")
    assert done.returncode == 2 and "repository.root = " in done.stderr and "not a folder" in done.stderr, done.stderr


def test_a_follower_refuses_a_folder_it_cannot_create(tmp_path):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "models"  # below a file: no one can create it
    done = serve("--follow", f"tcp://127.0.0.1:{free_port()}", "--repo", str(target))
    assert done.returncode == 2, done.stderr
    assert f"--repo = {str(target)!r}: cannot create the folder" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "file").is_dir()


def test_a_missing_folder_that_can_be_made_is_fine(tmp_path):
    later = tmp_path / "not" / "yet"
    check_repository_root(later, "--repo", following=False)  # a publisher makes it later: nothing created now
    assert not later.exists()
    check_repository_root(later, "--repo", following=True)  # a follower writes there: made now
    assert later.is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(CLAgentError, match=r"--repo = .*file.*cannot be created: .*file is not a folder"):
        check_repository_root(tmp_path / "file" / "models", "--repo", following=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_an_unreadable_folder_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o000)
    try:
        with pytest.raises(CLAgentError, match="not readable"):
            check_repository_root(locked, "repository.root", following=False)
    finally:
        locked.chmod(0o755)


def test_a_silent_agent_is_warned_about_at_a_bounded_rate_and_its_return_noted(tmp_path, caplog):
    port = free_port()
    follower = RepositoryFollower(
        f"tcp://127.0.0.1:{port}", None, ModelRepository(tmp_path / "edge", "student"),
        poll_s=0.3, retry_s=0.1, timeout_s=5.0, silent_warn_s=0.4, silent_repeat_s=60.0,
    )  # fmt: skip
    caplog.set_level(logging.INFO, logger="cl_agent.follower")
    silent = [r for r in caplog.records if "has not answered" in r.getMessage()]
    with follower:
        # its first request waits 4 x 5 s for a reply: the warning comes long before that fails
        assert wait_until(lambda: any("has not answered" in r.getMessage() for r in caplog.records), 5)
        time.sleep(1.0)
        silent = [r for r in caplog.records if "has not answered" in r.getMessage()]
        assert len(silent) == 1 and silent[0].levelno == logging.WARNING  # once, not once per check or attempt
        assert f"tcp://127.0.0.1:{port}" in silent[0].getMessage()
        source = ModelRepository(tmp_path / "agent", "student")
        with ModelFetchService(source, f"tcp://127.0.0.1:{port}"):  # the agent comes up: the waiting request is answered
            assert wait_until(lambda: any("answers again" in r.getMessage() for r in caplog.records), 10)


def test_check_silence_repeats_only_after_the_repeat_interval(tmp_path, caplog):
    follower = RepositoryFollower(
        f"tcp://127.0.0.1:{free_port()}", None, ModelRepository(tmp_path, "student"), silent_warn_s=10, silent_repeat_s=60
    )
    start = follower.silence.last_answer
    assert not follower.check_silence(start + 9)
    assert follower.check_silence(start + 10)
    assert not follower.check_silence(start + 69)
    assert follower.check_silence(start + 70)
    follower.client.close()


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a shell starts a background job (`cl-agent serve &`)


@pytest.mark.parametrize(
    "module, signum",
    [("cl_agent", signal.SIGINT), ("cl_agent.cli", signal.SIGINT), ("cl_agent", signal.SIGTERM)],
    ids=["entry-sigint", "cli-module-sigint", "entry-sigterm"],
)
def test_serve_started_with_sigint_ignored_stops_cleanly_on_the_signal(tmp_path, module, signum):
    command = [sys.executable, "-m", module, "serve", "--repo", str(tmp_path), "--set", f"serve.endpoint=tcp://127.0.0.1:{free_port()}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               preexec_fn=_ignore_sigint, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in process.stdout:
            if "answering 'no_model'" in line:  # up and serving
                break
        process.send_signal(signum)
        rest = process.communicate(timeout=30)[0]
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, rest
    assert "stopping" in rest and "stopped after 0 requests" in rest
