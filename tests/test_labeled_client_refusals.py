"""What a labeled client, send_labeled.py and `cl-agent status --control` say when the agent refuses them
(CURVE on one side only, an unauthorized key), when --batch is past the wire's part limit, and what a
status query on the control endpoint prints."""

import json
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from cl_agent.cli import app
from cl_agent.client import AgentRefused, LabeledClient, control_status
from cl_agent.errors import CLAgentError
from ingest_support import free_port, images, make_service

TOOL = Path(__file__).resolve().parents[1] / "tools" / "send_labeled.py"


def _tree(root: Path) -> Path:
    for name, seed in (("cat", 0), ("dog", 1)):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images(2, 16, seed)):
            cv2.imwrite(str(root / name / f"{i}.png"), image)
    return root


NO_KEYS = "the agent uses CURVE and this client has no keys"
REJECTED = "rejected this client's CURVE key"


def test_a_labeled_client_refused_by_curve_says_why_at_once(tmp_path, curve_keys):
    curve, server_public, allowed_secret, rogue_secret = curve_keys
    with make_service(tmp_path / "agent", ingest={"curve": curve}) as service:
        endpoint = service.endpoints["labeled"]
        # a long timeout: only the handshake's refusal can end the wait before the test's own limit
        for kwargs, expected in (({}, NO_KEYS), ({"curve_secret_key": rogue_secret, "curve_server_key": server_public}, REJECTED)):
            with LabeledClient(endpoint, "rogue", timeout_s=60, retries=0, **kwargs) as client:
                with pytest.raises(AgentRefused, match=expected) as refused:
                    client.send(images(1), ["cat"])
                assert "1 message not delivered" in str(refused.value) and endpoint in refused.value.refusal
                assert client.in_flight == 1
                with pytest.raises(AgentRefused, match=expected):  # the next wait tries a new connection, refused too
                    client.flush()
        with LabeledClient(endpoint, "robot", curve_secret_key=allowed_secret, curve_server_key=server_public) as good:
            assert good.send(images(1), ["cat"]).ok
        assert service.counters()["labeled_images_acked"] == 1


def test_send_labeled_says_the_agent_uses_curve_or_rejected_the_key(tmp_path, curve_keys):
    curve, server_public, _, rogue_secret = curve_keys
    root = _tree(tmp_path / "data")
    with make_service(tmp_path / "agent", ingest={"curve": curve}) as service:
        endpoint = service.endpoints["labeled"]
        common = [sys.executable, str(TOOL), str(root), "--endpoint", endpoint, "--timeout", "60", "--retries", "0"]
        results = [
            (subprocess.run(common, capture_output=True, text=True, timeout=50), NO_KEYS),
            (subprocess.run([*common, "--curve-secret", str(rogue_secret), "--curve-server", str(server_public)],
                            capture_output=True, text=True, timeout=50), REJECTED),
        ]
    for result, expected in results:
        assert result.returncode == 1, result.stderr
        assert expected in result.stderr and "nothing is known to be stored" in result.stderr
        assert "no reply came" not in result.stderr and "Traceback" not in result.stderr


def test_send_labeled_refuses_a_batch_past_the_part_limit_before_sending(tmp_path):
    root = _tree(tmp_path / "data")
    result = subprocess.run([sys.executable, str(TOOL), str(root), "--batch", "300", "--endpoint", f"tcp://127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "--batch 300" in result.stderr and "at most 256 images per message" in result.stderr
    assert "default limit" in result.stderr and "--max-batch" in result.stderr
    helped = subprocess.run([sys.executable, str(TOOL), "--help"], capture_output=True, text=True, timeout=30)
    assert "at most --max-batch: 256 under the default limit" in " ".join(helped.stdout.split())


def test_send_labeled_sends_up_to_a_raised_max_batch(tmp_path):
    root = _tree(tmp_path / "data")
    with make_service(tmp_path / "agent", wire={"max_parts": 301}) as service:
        result = subprocess.run([sys.executable, str(TOOL), str(root), "--batch", "300", "--max-batch", "300",
                                 "--endpoint", service.endpoints["labeled"]], capture_output=True, text=True, timeout=60)
        assert service.counters()["labeled_messages"] == 1
    assert result.returncode == 0, result.stderr
    assert "4 images acked, 0 refused" in result.stdout


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_status_control_prints_an_ingest_process_counters(tmp_path):
    with make_service(tmp_path / "agent") as service:
        with LabeledClient(service.endpoints["labeled"], "robot") as client:
            assert client.send(images(3), ["cat", "dog", "cat"]).ok
        control = service.endpoints["control"]
        plain = invoke("status", "--control", control)
        raw = invoke("status", "--control", control, "--json")
        labeled = invoke("status", "--control", service.endpoints["labeled"], "--timeout", "5")
        frames = invoke("status", "--control", service.endpoints["frames"], "--timeout", "30")  # refused at once
    assert plain.exit_code == 0, plain.output
    lines = plain.output.splitlines()
    assert lines[0] == f"control: {control}" and lines[1] == "counters:"
    assert "  labeled_images_acked = 3" in lines and "  label_classes = 2" in lines
    assert raw.exit_code == 0, raw.output
    assert json.loads(raw.output)["labeled_images_acked"] == 3
    assert labeled.exit_code == 1 and "it answers as the agent's labeled endpoint" in labeled.output
    assert "ingest.control_endpoint (default port 5559)" in labeled.output
    assert frames.exit_code == 1 and f"{service.endpoints['frames']} refused a DEALER connection" in frames.output
    assert "ingest.control_endpoint" in frames.output and "frame endpoint" in frames.output


def test_status_control_under_curve(tmp_path, curve_keys):
    curve, server_public, allowed_secret, _ = curve_keys
    with make_service(tmp_path / "agent", ingest={"curve": curve}) as service:
        control = service.endpoints["control"]
        with pytest.raises(AgentRefused, match=NO_KEYS):
            control_status(control, timeout_s=60)
        keyed = invoke("status", "--control", control, "--curve-secret", allowed_secret, "--curve-server", server_public)
    assert keyed.exit_code == 0, keyed.output
    assert "  labeled_images_acked = 0" in keyed.output.splitlines()


def test_status_control_refuses_bad_options(tmp_path):
    bad = invoke("status", "--control", "localhost:5559")
    assert bad.exit_code == 2 and "--control 'localhost:5559'" in bad.output
    both = invoke("status", "--control", "tcp://127.0.0.1:5559", "--workdir", tmp_path)
    assert both.exit_code == 2 and "give one of them" in both.output
    stray = invoke("status", "--workdir", tmp_path, "--json")
    assert stray.exit_code == 2 and "--json is only for --control ENDPOINT or --live" in stray.output
    with pytest.raises(CLAgentError, match="ingest.control_endpoint"):
        control_status(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.1)


def _resolved(workdir: Path, control: str, **curve) -> Path:
    """The resolved config `cl-agent ingest` writes in its folder, with the given control endpoint."""
    from cl_agent.config import load_config, save_resolved

    values = {"agent.workdir": str(workdir), "ingest.control_endpoint": control}
    values |= {f"ingest.curve.{k}": v if isinstance(v, bool) else str(v) for k, v in curve.items()}
    return save_resolved(load_config(None, values), workdir / "ingest-config.yaml")


def test_status_of_an_ingest_only_folder_asks_the_process(tmp_path):
    with make_service(tmp_path / "agent") as service:
        with LabeledClient(service.endpoints["labeled"], "robot") as client:
            assert client.send(images(2), ["cat", "dog"]).ok
        control = service.endpoints["control"]
        _resolved(tmp_path / "agent", control.replace("127.0.0.1", "0.0.0.0"))  # a wildcard bind is asked on loopback
        plain = invoke("status", "--workdir", tmp_path / "agent")
        live = invoke("status", "--live", "--workdir", tmp_path / "agent", "--json")
    assert plain.exit_code == 0, plain.output
    lines = plain.output.splitlines()
    assert "ingestion-only process (cl-agent ingest)" in lines[0] and lines[1] == f"control: {control}"
    assert "  labeled_images_acked = 2" in lines
    assert live.exit_code == 0, live.output
    assert json.loads(live.output)["labeled_images_acked"] == 2


def test_status_live_reads_the_endpoint_from_the_config(tmp_path):
    with make_service(tmp_path / "agent") as service:
        config = tmp_path / "robot.yaml"
        config.write_text(f"ingest:\n  control_endpoint: {service.endpoints['control']}\n")
        result = invoke("status", "--live", "--config", config)
        overridden = invoke("status", "--live", "--set", f"ingest.control_endpoint={service.endpoints['control']}")
    for answer in (result, overridden):
        assert answer.exit_code == 0, answer.output
        assert "  labeled_images_acked = 0" in answer.output.splitlines()


def test_status_live_says_why_it_cannot_ask(tmp_path, curve_keys):
    import os
    import subprocess

    nothing = invoke("status", "--live", "--workdir", tmp_path)
    assert nothing.exit_code == 1 and "no resolved config" in nothing.output and "--control ENDPOINT" in nothing.output
    _resolved(tmp_path, f"tcp://127.0.0.1:{free_port()}")
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "agent.lock").write_text(f"{gone.pid}\n")  # the pid the last holder wrote, now gone
    stopped = invoke("status", "--workdir", tmp_path, "--timeout", "60")  # answered at once, without a query
    assert stopped.exit_code == 1 and f"not running: pid {gone.pid}" in stopped.output, stopped.output
    os.remove(tmp_path / "agent.lock")
    curve, _, _, _ = curve_keys
    _resolved(tmp_path, "tcp://127.0.0.1:6001", enabled=True, server_secret_key=curve.server_secret_key,
              authorized_clients_dir=curve.authorized_clients_dir)
    keyless = invoke("status", "--live", "--workdir", tmp_path)
    assert keyless.exit_code == 2 and "--curve-secret" in keyless.output and "ingest.curve.enabled" in keyless.output
    both = invoke("status", "--live", "--control", "tcp://127.0.0.1:6001")
    assert both.exit_code == 2 and "give one of them" in both.output
    empty = invoke("status", "--live", "--set", "ingest.control_endpoint=")
    assert empty.exit_code == 2 and "answers no status queries" in empty.output
