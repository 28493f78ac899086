"""The agent's last state.json names the version its server was serving when it stopped."""

from __future__ import annotations

from agent_harness import AgentProcess, tiny_agent_config
from ingest_support import wait_until

from cl_agent.config import ExportSection
from cl_agent.export import export_onnx
from cl_agent.inference import InferenceClient
from cl_agent.repository import ModelRepository
from cl_agent.status import read_state
from test_server import CLASSES, SIZE, tiny_net


def test_the_final_state_has_the_served_version_even_between_two_watches(tmp_path):
    # Asked every state_interval_s: with 60 s, only the question asked at the stop can know it.
    cfg, path = tiny_agent_config(tmp_path, **{"metrics.state_interval_s": 60.0})
    model = tmp_path / "tiny.onnx"
    export_onnx([tiny_net(0)], model, image_size=SIZE, mean=[0.5] * 3, std=[0.25] * 3, export=ExportSection())
    ModelRepository(cfg.repository.root, cfg.agent.model_name).publish(model, {"class_names": CLASSES, "image_size": SIZE})
    agent = AgentProcess(path, tmp_path / "agent.log")
    try:
        with InferenceClient(cfg.serve.endpoint, timeout_s=2.0, retries=0) as client:
            def serving() -> bool:
                try:
                    return client.status().get("model_version") == 1
                except Exception:  # noqa: BLE001 - not up yet
                    return False

            assert wait_until(serving, 120), "the hosted server never served version 1"
    finally:
        assert agent.terminate(60) == 0
    state = read_state(cfg.agent.workdir)
    assert state["status"] == "stopped" and state["served_version"] == 1
