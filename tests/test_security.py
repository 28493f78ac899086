"""CURVE: an allowed key delivers, an unknown key or no key delivers nothing."""

import time

import pytest
from typer.testing import CliRunner

from cl_agent.cli import app
from cl_agent.client import AgentUnavailable, FrameClient, LabeledClient
from cl_agent.config import CurveSection
from cl_agent.errors import CLAgentError
from cl_agent.security import load_keys, make_keypair
from ingest_support import images, make_service, wait_until


def test_only_authorized_keys_deliver(tmp_path, curve_keys):
    curve, server_public, allowed_secret, rogue_secret = curve_keys
    service = make_service(tmp_path / "agent", ingest={"curve": curve})
    with service:
        endpoint = service.endpoints["labeled"]
        good = LabeledClient(endpoint, "robot", curve_secret_key=allowed_secret, curve_server_key=server_public)
        assert good.send(images(2), ["a", "b"]).ok
        good.close()
        for kwargs in ({"curve_secret_key": rogue_secret, "curve_server_key": server_public}, {}):
            bad = LabeledClient(endpoint, "rogue", timeout_s=0.3, retries=1, **kwargs)
            with pytest.raises(AgentUnavailable):
                bad.send(images(2), ["x", "y"])
            bad.close()
        rogue_frames = FrameClient(service.endpoints["frames"], "rogue-cam", curve_secret_key=rogue_secret, curve_server_key=server_public)
        for image in images(5, 16):
            rogue_frames.send(image)
        good_frames = FrameClient(service.endpoints["frames"], "cam", curve_secret_key=allowed_secret, curve_server_key=server_public)
        assert wait_until(lambda: good_frames.send(images(1, 16)[0]) and service.counters()["frames_accepted"] > 0)
        time.sleep(0.2)
        rogue_frames.close()
        good_frames.close()
        counters = service.counters()
        sources = set(service.reservoir.sources()) if service.reservoir.per_source else {f.source for f in service.reservoir.sample(100)}
    assert counters["labeled_images_acked"] == 2 and counters["labeled_messages"] == 1
    assert sources == {"cam"}
    assert service.labels.names == ["a", "b"]


def test_missing_keys_fail_loudly(tmp_path):
    curve = CurveSection(enabled=True, server_secret_key=str(tmp_path / "none.key_secret"), authorized_clients_dir=str(tmp_path))
    with pytest.raises(CLAgentError, match="not found"):
        make_service(tmp_path / "agent", ingest={"curve": curve}).start()
    public, _ = make_keypair(tmp_path, "x")
    with pytest.raises(CLAgentError, match="no secret key"):
        load_keys(public, need_secret=True)


def test_keys_make_command(tmp_path):
    result = CliRunner().invoke(app, ["keys", "make", str(tmp_path / "k"), "--name", "cam"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "k" / "cam.key").is_file() and (tmp_path / "k" / "cam.key_secret").is_file()
    public, secret = load_keys(tmp_path / "k" / "cam.key_secret", need_secret=True)
    assert len(public) == 40 and len(secret) == 40


def test_keys_make_refuses_to_replace_a_key_pair_unless_forced(tmp_path):
    runner = CliRunner()
    command = ["keys", "make", str(tmp_path / "k"), "--name", "robot"]
    assert runner.invoke(app, command).exit_code == 0
    secret_path = tmp_path / "k" / "robot.key_secret"
    first = secret_path.read_bytes()

    result = runner.invoke(app, command)
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "robot.key_secret" in result.output and "robot.key" in result.output and "--force" in result.output
    assert "Traceback" not in result.output
    assert secret_path.read_bytes() == first  # the secret key is untouched

    result = runner.invoke(app, [*command, "--force"])
    assert result.exit_code == 0, result.output
    assert secret_path.read_bytes() != first
    with pytest.raises(CLAgentError, match="already exist"):
        make_keypair(tmp_path / "k", "robot")


def test_keys_make_refuses_a_public_key_left_alone(tmp_path):
    public, secret = make_keypair(tmp_path, "cam")
    secret.unlink()  # only the public half is left: still not silently replaced
    with pytest.raises(CLAgentError, match="cam.key"):
        make_keypair(tmp_path, "cam")


def test_keys_make_into_a_file_is_a_clear_error(tmp_path):
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    result = CliRunner().invoke(app, ["keys", "make", str(path)])
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit)
    assert "not a folder" in result.output and str(path) in result.output
    assert "Traceback" not in result.output
    nested = CliRunner().invoke(app, ["keys", "make", str(path / "sub")])
    assert nested.exit_code != 0 and isinstance(nested.exception, SystemExit) and str(path) in nested.output


def test_a_missing_folder_of_client_keys_is_named_by_its_config_key(tmp_path):
    import zmq

    from cl_agent.security import start_authenticator

    curve = CurveSection(enabled=True, server_secret_key=str(tmp_path / "agent.key_secret"),
                         authorized_clients_dir=str(tmp_path / "clients"))
    with pytest.raises(CLAgentError, match=r"^ingest\.curve\.authorized_clients_dir = '.*clients': not a folder"):
        start_authenticator(zmq.Context.instance(), curve)
