"""`cl-agent demo` that cannot run says why: a bad --device before anything starts, an agent's own reason when it exits."""

from __future__ import annotations

import json
import time

import pytest
import torch

from cl_agent.demo import TINY, exit_reason, run_demo
from cl_agent.errors import CLAgentError


def test_a_device_that_is_not_one_is_named_as_the_option(tmp_path):
    with pytest.raises(CLAgentError) as refused:
        run_demo(tmp_path / "demo", experiences=1, device="gpu")
    assert str(refused.value) == "--device = 'gpu': expected auto, cpu, cuda or cuda:N"
    assert not (tmp_path / "demo").exists()  # refused before the folder was made or an agent started


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_on_a_machine_without_it_is_refused_before_streaming(tmp_path):
    with pytest.raises(CLAgentError, match="--device = 'cuda': CUDA is not available"):
        run_demo(tmp_path / "demo", experiences=1, device="cuda")
    assert not (tmp_path / "demo").exists()


def test_an_agent_that_cannot_start_is_reported_with_its_reason_before_streaming(tmp_path, capsys):
    (tmp_path / "models-file").write_text("x")
    started = time.monotonic()
    with pytest.raises(CLAgentError) as failed:
        run_demo(tmp_path / "demo", experiences=1, device="cpu", timeout_s=120,
                 overrides={**TINY, "repository.root": str(tmp_path / "models-file")})  # fmt: skip
    message = str(failed.value)
    assert message.startswith("the agent exited with code 2: repository.root = "), message
    assert "not a folder" in message and str(tmp_path / "demo" / "agent.log") in message
    assert "experience 1/1" not in capsys.readouterr().out  # nothing was streamed to a dead agent
    assert time.monotonic() - started < 60


def test_exit_reason_prefers_the_state_stop_error_then_the_logged_error(tmp_path):
    log = tmp_path / "agent.log"
    assert exit_reason(tmp_path, log) is None  # neither there
    log.write_text(
        "2026-01-01T00:00:00.000Z INFO cl_agent.agent: starting\n"
        "2026-01-01T00:00:01.000Z ERROR cl_agent.agent: trainer cannot start: no memory; stopping\n"
    )
    assert exit_reason(tmp_path, log) == "trainer cannot start: no memory; stopping"
    log.write_text(log.read_text() + "\x1b[31merror: agent.device = 'cuda': CUDA is not available on this machine\x1b[0m\n")
    assert exit_reason(tmp_path, log) == "agent.device = 'cuda': CUDA is not available on this machine"
    (tmp_path / "state.json").write_text(json.dumps({"status": "stopped", "stop_error": "hosted server cannot run: x"}))
    assert exit_reason(tmp_path, log) == "hosted server cannot run: x"
    traceback = tmp_path / "crash.log"
    traceback.write_text('Traceback (most recent call last):\n  File "x.py", line 1, in <module>\nRuntimeError: boom\n')
    assert exit_reason(tmp_path / "none", traceback) == "RuntimeError: boom"
