"""Help text as a user reads it: flags without a value placeholder, what happens without --config, a readable stop line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from cl_agent.cli import app
from cl_agent.server import served_summary


def commands(group, path=()):
    """Every command path of the app, groups included (``()`` is the app itself)."""
    yield path
    for name, command in getattr(group, "commands", {}).items():
        yield from commands(command, (*path, name))


ALL = list(commands(typer.main.get_command(app)))


@pytest.mark.parametrize("path", ALL, ids=lambda path: " ".join(path) or "cl-agent")
def test_flags_show_no_value_placeholder(path):
    result = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
    assert result.exit_code == 0, result.output
    assert "<bool>" not in result.output
    help_line = next(line for line in result.output.splitlines() if line.strip().startswith("--help"))
    assert help_line.split() == ["--help", "Show", "this", "message", "and", "exit."]


def test_a_flag_and_an_option_with_a_value_read_differently():
    text = CliRunner().invoke(app, ["predict", "--help"], terminal_width=100).output
    lines = {line.split()[0]: line for line in text.splitlines() if line.strip().startswith("-")}
    assert lines["--json"].split()[:3] == ["--json", "One", "JSON"]  # nothing between the flag and its help
    assert "--endpoint <str>" in lines["--endpoint"] and "--set KEY=VALUE" in lines["--set"]


@pytest.mark.parametrize("command", ["run", "serve", "config"])
def test_help_says_what_happens_without_a_config(command):
    text = " ".join(CliRunner().invoke(app, [command, "--help"], terminal_width=100).output.split())
    assert "Without it, the built-in defaults" in text


def test_the_command_list_gives_whole_first_sentences():
    output = CliRunner().invoke(app, ["--help"], terminal_width=80).output
    listing = output[output.index("Commands:"):]
    assert "..." not in listing  # the plain layout cut each summary at the terminal width
    assert "Run the agent: ingest streams, update the student per experience, export and publish models." in " ".join(listing.split())


def test_served_summary_is_one_readable_line():
    counters = {"requests": 4, "images": 6, "batches": 3, "errors": 1, "swaps": 1, "swap_failures": 0,
                "busy_poll_hits": 2, "largest_batch": 2, "busy_s": 0.01234, "inference_s": 0.00567}  # fmt: skip
    assert served_summary(counters) == (
        "4 requests (6 images in 3 batches, largest 2; 1 refused), 1 version swaps (0 refused), 0.01 s busy (0.01 s in inference)"
    )


def test_the_serve_stop_line_is_not_a_dict(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [sys.executable, "-m", "cl_agent", "serve", "--repo", str(tmp_path), "--set", f"serve.endpoint=tcp://127.0.0.1:{port}"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in process.stdout:
            if "answering 'no_model'" in line:  # started
                break
        process.send_signal(signal.SIGINT)
        rest = process.communicate(timeout=20)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, rest
    (stop,) = [line for line in rest.splitlines() if "stopped" in line]
    assert stop.endswith("stopped after 0 requests (0 images in 0 batches, largest 0; 0 refused), 0 version swaps (0 refused), 0.00 s busy (0.00 s in inference)")
