"""LiveView: periodic lines when not on a TTY, in-place redraws on one, logs kept above the block."""

import io
import logging

import pytest

from cl_agent.config import MetricsSection
from cl_agent.console import LiveView
from cl_agent.logs import setup_logging


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class TtyStringIO(io.StringIO):
    def isatty(self):
        return True


def test_non_tty_prints_one_line_per_interval():
    stream, clock = io.StringIO(), FakeClock()
    view = LiveView(stream, interval_s=5.0, clock=clock)
    assert not view.tty

    view.update({"experience": 3, "phase": "training", "step": 10, "steps": 40, "ingest": {"labeled": 100, "frame": 0}})
    view.update({"step": 20, "losses": {"ce": 0.5, "mlkd": 0.125}})  # within the interval: not printed yet
    assert stream.getvalue().splitlines() == [
        "experience 3 training step 10/40 [#####---------------] 25% | loss - | ingest - | model none published yet"
    ]

    clock.now += 5.0
    view.update({"ingest": {"labeled": 150, "frame": 500}, "backlog": 1, "published_version": 2, "served_version": 1})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert lines[1] == (
        "experience 3 training step 20/40 [##########----------] 50% | loss ce 0.5000 mlkd 0.1250 "
        "| ingest labeled 10.0/s frame 100.0/s backlog 1 | model published v2 served v1"
    )
    assert "\x1b" not in stream.getvalue()

    clock.now += 1.0
    view.update({"step": 40, "online_accuracy": 0.625})
    view.close()
    view.update({"step": 99})  # ignored after close
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert "step 40/40 [####################] 100%" in lines[2]
    assert lines[2].endswith("online accuracy 0.625")


def test_close_without_changes_prints_nothing_more():
    stream = io.StringIO()
    view = LiveView(stream, interval_s=5.0, clock=FakeClock())
    view.update({"experience": 0})
    view.close()
    assert len(stream.getvalue().splitlines()) == 1


def test_tty_redraws_the_block_in_place():
    stream, clock = TtyStringIO(), FakeClock()
    view = LiveView(stream, min_redraw_s=0.0, clock=clock)
    assert view.tty
    view.update({"experience": 1, "step": 1, "steps": 2})
    first = stream.getvalue()
    assert first.count("\n") == 4 and "\x1b[4F" not in first
    clock.now += 1.0
    view.update({"step": 2})
    second = stream.getvalue()[len(first):]
    assert second.startswith("\x1b[4F\x1b[J")  # up four lines, erase, redraw
    assert "step 2/2" in second


def test_logs_go_above_the_live_block():
    stream, clock = TtyStringIO(), FakeClock()
    view = LiveView(stream, min_redraw_s=0.0, clock=clock)
    view.update({"experience": 5})
    root = logging.getLogger()
    level = root.level
    handlers = setup_logging("info", json_lines=False, stream=view.log_stream())
    try:
        logging.getLogger("cl_agent.test").info("published version 7")
    finally:
        for handler in handlers:
            root.removeHandler(handler)
        root.setLevel(level)
    after = stream.getvalue().split("published version 7\n", 1)[1]
    assert after.startswith("\x1b[2Kexperience 5")  # the block was redrawn below the record


def test_from_section():
    assert LiveView.from_section(MetricsSection(console=False), io.StringIO()) is None
    view = LiveView.from_section(MetricsSection(console_interval_s=2.5), io.StringIO())
    assert view.interval_s == pytest.approx(2.5)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, "model   none published yet"),
        ({"published_version": 3}, "model   published v3  served unknown"),
        ({"served_version": 2}, "model   published none yet  served v2"),
        ({"published_version": 3, "served_version": 2, "online_accuracy": 0.62}, "model   published v3  served v2  online accuracy 0.620"),
    ],
)
def test_the_model_line_says_in_words_what_is_not_known_yet(fields, expected):
    view = LiveView(io.StringIO(), interval_s=60.0, clock=FakeClock())
    view.update(fields)
    assert view.lines()[-1] == expected


def test_json_logs_on_a_pipe_get_no_progress_lines_between_them():
    import io

    from cl_agent.agent import live_view
    from cl_agent.config import load_config

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    plain, json_logs = load_config(None), load_config(None, {"agent.log_json": True})
    assert live_view(plain, io.StringIO()) is not None  # plain logs: a progress line now and then
    assert live_view(json_logs, io.StringIO()) is None  # JSON lines for a collector: nothing else on the pipe
    assert live_view(json_logs, Terminal()) is not None  # a person at a terminal still sees the view
    assert live_view(load_config(None, {"metrics.console": False}), Terminal()) is None
