"""The state.json a stopped agent leaves counts what the trainer finished during the stop."""

from __future__ import annotations

from types import SimpleNamespace

from cl_agent.agent import Agent
from cl_agent.config import load_config
from cl_agent.metrics import AgentMetrics
from cl_agent.status import initial_state, read_state


class Results:
    """The trainer's results queue, holding what it sent while the agent stopped."""

    def __init__(self, items):
        self.items = list(items)

    def get_nowait(self):
        import queue

        if not self.items:
            raise queue.Empty
        return self.items.pop(0)

    def cancel_join_thread(self):
        pass


def test_an_update_finished_during_the_stop_is_not_left_pending(tmp_path):
    agent = Agent(load_config(None, {"agent.workdir": str(tmp_path)}))
    record = {"experience": 0, "merged": [0], "version": 1, "labeled": 20, "unlabeled": 0, "online_accuracy": 0.5,
              "update_seconds": 1.0, "export_seconds": 0.5, "losses": {}}
    agent.results = Results([record])
    ingest = SimpleNamespace(stop=lambda: None)  # experience 0 is marked trained (the store holds none waiting)
    state = initial_state() | {"pending_experiences": 1, "update": {"experience": 0}}  # as the last loop saw it
    agent._shutdown(ingest, state, None, AgentMetrics(), None)
    final = read_state(tmp_path)
    assert final["status"] == "stopped" and final["last_experience"] == 0
    assert final["pending_experiences"] == 0
