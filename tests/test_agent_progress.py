"""Progress of long work: elapsed and ETA while training, the reported phases after it, idle between updates."""

import io
import logging
import queue

import pytest

from cl_agent.agent import Agent
from cl_agent.config import load_config
from cl_agent.console import UNCHANGED_REPEAT, LiveView
from cl_agent.metrics import AgentMetrics
from cl_agent.status import (
    CHECKING_PARITY,
    CHECKPOINTING,
    EXPORTING,
    PUBLISHING,
    TRAINING,
    UpdateProgress,
    duration_text,
    initial_state,
)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def step(experience, done, planned, ce=0.5):
    return {"experience": experience, "phase": TRAINING, "step": done, "steps": planned, "losses": {"ce": ce}}


def phase(experience, name, done, planned):
    """The trainer process's message as a phase after training begins: the steps training did, no losses."""
    return {"experience": experience, "phase": name, "step": done, "steps": planned}


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (45, "45s"), (185, "3m05s"), (3720, "1h02m")])
def test_duration_text(seconds, text):
    assert duration_text(seconds) == text


def test_progress_estimates_the_time_left_from_the_steps_after_the_first():
    clock = FakeClock()
    progress = UpdateProgress(clock=clock)
    assert progress.snapshot() is None  # idle
    progress.report(step(1, 1, 11))
    clock.now += 30.0  # the first step's one-off costs are not in the estimate
    assert progress.snapshot()["eta_s"] is None and progress.snapshot()["phase"] == TRAINING
    progress.report(step(1, 2, 11))
    clock.now += 2.0
    progress.report(step(1, 3, 11))  # 16 s per step since the first report
    snap = progress.snapshot()
    assert snap["phase"] == TRAINING and (snap["step"], snap["steps"]) == (3, 11)
    assert snap["elapsed_s"] == pytest.approx(32.0) and snap["eta_s"] == pytest.approx(8 * 16.0)
    clock.now += 6.0
    assert progress.snapshot()["eta_s"] == pytest.approx(8 * 16.0 - 6.0)  # counts down between reports


def test_steps_read_together_in_one_batch_give_no_estimate_until_time_has_passed():
    clock = FakeClock()
    progress = UpdateProgress(clock=clock)
    for done in (1, 2, 3, 4):  # the agent reads the trainer's messages every 0.25 s: a burst at one time
        progress.report(step(0, done, 100))
    assert progress.snapshot()["eta_s"] is None  # not 0: no time has been measured yet
    clock.now += 2.0
    progress.report(step(0, 8, 100))  # 4 steps since the burst's last one in 2 s
    assert progress.snapshot()["eta_s"] == pytest.approx(92 * 0.5)


def test_after_the_last_step_each_reported_phase_is_shown_with_its_own_clock_until_the_result_arrives():
    clock = FakeClock()
    progress = UpdateProgress(clock=clock)
    for done in (1, 2, 3):
        progress.report(step(4, done, 3))
        clock.now += 1.0
    clock.now += 5.0
    snap = progress.snapshot()  # nothing reported after the last step yet: still training (not a guessed export)
    assert snap["phase"] == TRAINING and snap["eta_s"] == 0.0 and snap["phase_elapsed_s"] == pytest.approx(8.0)
    progress.report(phase(4, CHECKPOINTING, 3, 3))
    clock.now += 2.0
    snap = progress.snapshot()
    assert snap["phase"] == CHECKPOINTING and snap["phase_elapsed_s"] == pytest.approx(2.0)
    assert snap["eta_s"] == 0.0 and snap["elapsed_s"] == pytest.approx(10.0) and (snap["step"], snap["steps"]) == (3, 3)
    for name in (EXPORTING, CHECKING_PARITY, PUBLISHING):
        progress.report(phase(4, name, 3, 3))
        clock.now += 7.0
        snap = progress.snapshot()
        assert snap["phase"] == name and snap["phase_elapsed_s"] == pytest.approx(7.0)  # counted from its own start
    progress.report(phase(4, PUBLISHING, 3, 3))  # the same phase again (e.g. read twice) keeps its start
    assert progress.snapshot()["phase_elapsed_s"] == pytest.approx(7.0)
    progress.finish()
    assert progress.snapshot() is None
    progress.report(step(5, 1, 10))  # the next update starts its own clock
    assert progress.snapshot()["experience"] == 5 and progress.snapshot()["elapsed_s"] == 0.0


def test_a_spent_time_budget_caps_the_eta_and_the_phase_reported_before_the_last_step_is_shown():
    clock = FakeClock()
    progress = UpdateProgress(time_budget_s=60.0, clock=clock)
    progress.report(step(0, 1, 1000))
    clock.now += 10.0
    progress.report(step(0, 2, 1000))
    assert progress.snapshot()["eta_s"] == pytest.approx(50.0)  # not 998 * 10 s: the budget stops it
    clock.now += 55.0
    snap = progress.snapshot()  # the budget is spent, but the step that spends it is still running
    assert snap["phase"] == TRAINING and snap["eta_s"] == 0.0
    clock.now += 5.0
    progress.report(phase(0, CHECKPOINTING, 3, 1000))  # training ended after 3 of 1000 steps
    clock.now += 4.0
    snap = progress.snapshot()
    assert (snap["phase"], snap["step"], snap["steps"]) == (CHECKPOINTING, 3, 1000)
    assert snap["eta_s"] == 0.0 and snap["phase_elapsed_s"] == pytest.approx(4.0)


def test_a_phase_reported_before_any_step_starts_the_update_and_a_message_without_a_phase_is_a_step():
    clock = FakeClock()
    progress = UpdateProgress(clock=clock)
    progress.report(phase(6, EXPORTING, 2, 9))  # its step messages were lost (a full queue)
    clock.now += 3.0
    snap = progress.snapshot()
    assert (snap["experience"], snap["phase"], snap["step"]) == (6, EXPORTING, 2) and snap["phase_elapsed_s"] == pytest.approx(3.0)
    progress.report({"experience": 7, "step": 1, "steps": 4})  # the next update, from a sender that names no phase
    assert progress.snapshot()["phase"] == TRAINING and progress.snapshot()["experience"] == 7
    progress.report({"experience": 7, "phase": None, "step": 2, "steps": 4})  # not a phase name: ignored
    assert progress.snapshot()["step"] == 1


def test_the_view_shows_elapsed_and_eta_then_the_export_phase_then_idle_without_a_bar():
    view = LiveView(io.StringIO(), interval_s=60.0, clock=FakeClock())
    view.update({"published_version": 1, "phase": TRAINING, "experience": 2, "step": 119, "steps": 160,
                 "elapsed_s": 190.0, "eta_s": 65.0})
    assert view.lines()[0] == "experience 2  training  step 119/160  [###############-----]  74%  elapsed 3m10s  eta 1m05s"
    view.update({"phase": EXPORTING, "step": 160, "phase_elapsed_s": 12.0})
    assert view.lines()[0] == "experience 2  exporting  after 160/160 steps  for 12s"
    view.update({"phase": CHECKING_PARITY, "step": 137, "phase_elapsed_s": 3.0})  # the time budget ended training early
    assert view.lines()[0] == "experience 2  checking parity  after 137/160 steps  for 3s"
    view.update({"phase": "idle", "published_version": 2})
    assert view.lines()[0] == "idle (version 2)"


def test_off_a_tty_an_unchanged_line_is_repeated_only_every_few_intervals():
    stream, clock = io.StringIO(), FakeClock()
    view = LiveView(stream, interval_s=10.0, clock=clock)
    view.update({"phase": "idle", "published_version": 3, "backlog": 0})
    for _ in range(UNCHANGED_REPEAT * 10 - 1):  # every second, for just under six intervals
        clock.now += 1.0
        view.update({"backlog": 0})
    assert stream.getvalue().count("\n") == 1
    clock.now += 1.0
    view.update({"backlog": 0})
    assert stream.getvalue().count("\n") == 2  # a sign of life after UNCHANGED_REPEAT intervals
    clock.now += 10.0
    view.update({"backlog": 1})  # a change is printed at the next interval
    assert stream.getvalue().splitlines()[-1].endswith("backlog 1 | model published v3 served unknown")


def test_the_agent_feeds_progress_to_state_and_view_and_logs_the_export_time(tmp_path, caplog):
    view = LiveView(io.StringIO(), interval_s=60.0, clock=FakeClock())
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path / "w"), "repository.root": str(tmp_path / "r")}), view)
    agent.results = queue.Queue()
    metrics = AgentMetrics()
    state = initial_state()
    for done in (1, 2):
        agent.results.put({"progress": step(0, done, 3, ce=0.25 * done)})
    agent._drain_results(state, metrics, view)
    assert agent.progress.snapshot()["phase"] == TRAINING
    agent.results.put({"progress": phase(0, CHECKPOINTING, 2, 3)})  # the time budget ended training after 2 of 3 steps
    agent.results.put({"progress": phase(0, EXPORTING, 2, 3)})
    agent._drain_results(state, metrics, view)
    assert agent.progress.snapshot()["phase"] == EXPORTING
    assert view.lines()[0].startswith("experience 0  exporting  after 2/3 steps")
    assert view.lines()[1] == "loss    ce 0.5000"  # a phase message carries no losses: the last step's stay

    agent.results.put({
        "experience": 0, "merged": [0], "labeled": 16, "unlabeled": 8, "online_accuracy": None, "losses": {"ce": 1.0},
        "update_seconds": 23.5, "export_seconds": 4.25, "version": None, "recovered": False,
        "publish_error": "the repository is read-only",
    })
    with caplog.at_level(logging.INFO, logger="cl_agent.agent"):
        agent._drain_results(state, metrics, view)
    assert agent.progress.snapshot() is None and view.lines()[0] == "idle (no version published yet)"
    assert "in 27.8 s (training 23.5 s, export and publish 4.2 s)" in caplog.text
