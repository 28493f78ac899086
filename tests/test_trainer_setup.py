"""A trainer that cannot start with the configuration stops the agent with the reason, instead of a restart loop."""

import queue
import threading

import pytest

from cl_agent.agent import Agent
from cl_agent.config import load_config
from cl_agent.metrics import AgentMetrics
from cl_agent.status import initial_state
from cl_agent.updater import TrainerSetupError, update_loop


def test_an_unknown_backbone_is_a_setup_error_of_the_trainer(tmp_path):
    cfg = load_config(None, {"agent.workdir": str(tmp_path), "agent.device": "cpu", "model.backbone": "resnet_typo",
                             "repository.root": str(tmp_path / "models"), "repository.announce_endpoint": ""})
    with pytest.raises(TrainerSetupError, match="model.backbone = 'resnet_typo'"):
        update_loop(cfg, threading.Event())


def test_a_setup_error_stops_the_agent_with_exit_code_2_and_no_restart(tmp_path):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path)}))
    agent.results = queue.Queue()
    agent.results.put({"error": "model.backbone = 'resnet_typo': timm has no model of that name", "fatal": True})
    state = initial_state()
    agent._drain_results(state, AgentMetrics(), None)
    assert agent.stop_requested.is_set() and agent.exit_code == 2
    assert "resnet_typo" in state["stop_error"]
