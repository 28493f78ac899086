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


def test_the_config_command_shows_the_same_warning():
    result = CliRunner().invoke(app, ["config", "--set", "agent.device=cpu"])
    assert result.exit_code == 0
    assert "warning: updates train on the CPU (agent.device = 'cpu')" in result.output and "592 steps" in result.output
    quiet = CliRunner().invoke(app, ["config", "--set", "agent.device=cpu", "--set", "train.time_budget_s=300"])
    assert "warning" not in quiet.output


def test_the_agent_logs_the_trainers_warning_once_across_restarts(tmp_path, caplog):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path)}))
    agent.results = queue.Queue()
    text = warning_for()
    for _ in range(2):  # the trainer sends it at every start
        agent.results.put({"warning": text})
    with caplog.at_level(logging.WARNING, logger="cl_agent.agent"):
        agent._drain_results(initial_state(), AgentMetrics(), None)
    assert caplog.text.count("592 steps") == 1
