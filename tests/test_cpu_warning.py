"""Updates on the CPU with no time budget are warned about, naming the planned work (defaults unchanged)."""

import logging
import queue

from typer.testing import CliRunner

from cl_agent.agent import Agent, slow_training_warning
from cl_agent.cli import app
from cl_agent.config import AgentConfig, load_config
from cl_agent.metrics import AgentMetrics
from cl_agent.status import initial_state


def warning_for(cuda_available=False, **sets):
    cfg = load_config(None, sets)
    return slow_training_warning(cfg.agent, cfg.train, cfg.experience, cfg.model, cuda_available)


def test_the_default_config_on_a_cpu_is_warned_about_with_the_planned_steps():
    text = warning_for()
    assert "plans up to 592 steps (74 epochs x 8 batches" in text  # 500 labeled samples in batches of 64, 74 epochs at t = 0
    assert "resnet18 at 32 px" in text and "train.time_budget_s" in text and "train.epochs_base" in text
    assert "no CUDA on this machine" in text and "abandons the update" in text
    assert AgentConfig().train.time_budget_s == 0 and AgentConfig().train.epochs_base == 74  # defaults kept


def test_no_warning_with_a_time_budget_or_a_gpu():
    assert warning_for(**{"train.time_budget_s": 600}) is None
    assert warning_for(cuda_available=True) is None
    assert "agent.device = 'cpu'" in warning_for(cuda_available=True, **{"agent.device": "cpu"})
    smaller = warning_for(**{"train.epochs_base": 5, "train.epochs_min": 5, "experience.labeled_samples": 12,
                             "train.labeled_batch": 2})
    assert "plans up to 30 steps (5 epochs x 6 batches" in smaller


def test_the_warning_claims_no_duration_it_cannot_know():
    # a plan of a few steps: the text names the steps, and no "hour" it cannot know before they run
    few = warning_for(**{"train.epochs_base": 1, "train.epochs_min": 1, "experience.labeled_samples": 4,
                         "train.labeled_batch": 2})
    assert "plans up to 2 steps (1 epochs x 2 batches" in few
    assert "hour" not in few and "hour" not in warning_for()
    assert "warns again once the pace of the first steps puts an update at 30m00s or more" in few


def test_a_serving_machines_config_is_not_warned_about_training():
    # docs/deployment.md's edge.yaml: a server following an agent on another machine trains nothing here
    cfg = load_config(None, {"serve.follow_fetch_endpoint": "tcp://trainer.lan:5560"})
    assert slow_training_warning(cfg.agent, cfg.train, cfg.experience, cfg.model, False, cfg.serve) is None
    agent = load_config(None, {})
    assert slow_training_warning(agent.agent, agent.train, agent.experience, agent.model, False, agent.serve)


def test_the_config_command_shows_the_same_warning():
    result = CliRunner().invoke(app, ["config", "--set", "agent.device=cpu"])
    assert result.exit_code == 0
    assert "warning: updates train on the CPU (agent.device = 'cpu')" in result.output and "592 steps" in result.output
    quiet = CliRunner().invoke(app, ["config", "--set", "agent.device=cpu", "--set", "train.time_budget_s=300"])
    assert "warning" not in quiet.output
    edge = CliRunner().invoke(app, ["config", "--set", "agent.device=cpu", "--set", "serve.follow_fetch_endpoint=tcp://trainer.lan:5560"])
    assert edge.exit_code == 0 and "warning" not in edge.output  # a serving machine's config trains nothing


def test_the_agent_logs_the_trainers_warning_once_across_restarts(tmp_path, caplog):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path)}))
    agent.results = queue.Queue()
    text = warning_for()
    for _ in range(2):  # the trainer sends it at every start
        agent.results.put({"warning": text})
    with caplog.at_level(logging.WARNING, logger="cl_agent.agent"):
        agent._drain_results(initial_state(), AgentMetrics(), None)
    assert caplog.text.count("592 steps") == 1


def drain_progress(agent, messages, clock_times):
    """Feed the agent trainer progress messages, each read at its clock time."""
    from cl_agent.status import UpdateProgress

    now = iter(clock_times)
    current = {"t": 0.0}
    agent.progress = UpdateProgress(0.0, clock=lambda: current["t"])
    agent.results = queue.Queue()
    for message, t in zip(messages, now):
        current["t"] = t
        agent.results.put({"progress": message})
        agent._drain_results(initial_state(), AgentMetrics(), None)


def steps(experience, planned, count):
    return [{"experience": experience, "phase": "training", "step": s, "steps": planned, "losses": {}} for s in range(1, count + 1)]


def test_a_short_update_like_the_demos_is_not_warned_about_and_a_long_one_is_once(tmp_path, caplog):
    # the demo: 10 epochs x 6 batches of its ~180 labeled images at 5 s a step on a slow CPU: 5 minutes
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path), "agent.device": "cpu"}))
    with caplog.at_level(logging.WARNING, logger="cl_agent.agent"):
        drain_progress(agent, steps(0, 60, 3), [0.0, 5.0, 10.0])
    assert "time limit" not in caplog.text
    # the default schedule's first update: 592 steps at 6 s a step, about an hour
    with caplog.at_level(logging.WARNING, logger="cl_agent.agent"):
        drain_progress(agent, steps(1, 592, 3), [0.0, 6.0, 12.0])
        drain_progress(agent, steps(2, 592, 3), [0.0, 6.0, 12.0])
    assert caplog.text.count("no time limit") == 1
    assert "the update of experience 1 plans 592 steps" in caplog.text and "about 59m" in caplog.text
    assert "train.time_budget_s" in caplog.text
    budgeted = Agent(load_config(None, {"agent.workdir": str(tmp_path), "train.time_budget_s": 600}))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cl_agent.agent"):
        drain_progress(budgeted, steps(1, 592, 3), [0.0, 6.0, 12.0])
    assert "no time limit" not in caplog.text
