"""The agent's fetch endpoint tells following servers where it announces new versions."""

from agent_harness import tiny_agent_config
from cl_agent.agent import Agent
from cl_agent.fetch import FetchClient


def _told(tmp_path, announce: str) -> str | None:
    cfg, _ = tiny_agent_config(tmp_path, **{"repository.fetch_endpoint": "tcp://127.0.0.1:0", "repository.announce_endpoint": announce})
    (tmp_path / "models" / cfg.agent.model_name).mkdir(parents=True, exist_ok=True)
    cfg.repository.root = str(tmp_path / "models")
    agent = Agent(cfg)
    agent._start_fetch_service()
    try:
        client = FetchClient(agent.fetch_service.endpoint, cfg.agent.model_name, timeout_s=5.0)
        try:
            client.list_versions()
            return client.agent_announce_endpoint
        finally:
            client.close()
    finally:
        agent.fetch_service.stop()


def test_the_fetch_endpoint_names_the_configured_announce_endpoint(tmp_path):
    assert _told(tmp_path / "a", "tcp://127.0.0.1:27557") == "tcp://127.0.0.1:27557"
    assert _told(tmp_path / "b", "") == ""  # not announcing: followers poll
    assert _told(tmp_path / "c", "tcp://127.0.0.1:0") is None  # a port picked at bind: not known here, not told
