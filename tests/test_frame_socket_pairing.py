"""A camera whose socket type does not pair with the agent's frame socket is told so, not left sending into nothing."""

import subprocess
import sys
from pathlib import Path

import pytest

from cl_agent.client import FrameClient, PeerRefused
from ingest_support import images, make_service, wait_until, write_video

TOOLS = Path(__file__).resolve().parents[1] / "tools"


@pytest.mark.parametrize(
    "camera, agent, theirs",
    [("pub", "pull", "PUSH"), ("push", "sub", "PUB"), ("push", "router", "PUB")],
)
def test_a_mismatched_camera_socket_is_refused_with_both_types_named(tmp_path, camera, agent, theirs):
    with make_service(tmp_path, ingest={"frame_socket": agent}) as service:
        frames = FrameClient(service.endpoints["frames"], "cam", socket_type=camera)
        try:
            with pytest.raises(PeerRefused) as refused:  # raised, not a False after the wait: the refusal is seen
                frames.wait_connected(30.0)
            message = str(refused.value)
            assert f"refused a {camera.upper()} connection" in message and f"it expects {theirs}" in message
            assert service.endpoints["frames"] in message
            with pytest.raises(PeerRefused):  # every later send says so too, instead of dropping the frame
                frames.send(images(1)[0])
        finally:
            frames.close()
        assert service.counters()["frames_received"] == 0


@pytest.mark.parametrize("camera, agent", [("push", "pull"), ("pub", "sub")])
def test_a_matching_pair_connects_and_delivers(tmp_path, camera, agent):
    with make_service(tmp_path, ingest={"frame_socket": agent}) as service:
        with FrameClient(service.endpoints["frames"], "cam", socket_type=camera) as frames:
            assert frames.wait_connected(2.0)
            assert wait_until(lambda: frames.send(images(1)[0]) and service.counters()["frames_accepted"] >= 3)


def test_no_agent_yet_is_not_a_refusal():
    import socket

    with socket.socket() as probe:  # a free port with nobody listening: the camera keeps trying, as before
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with FrameClient(f"tcp://127.0.0.1:{port}", socket_type="pub") as frames:
        assert frames.wait_connected(0.3) is False
        frames.send(images(1)[0])


def test_an_agent_that_hangs_up_mid_handshake_and_comes_back_is_not_a_refusal():
    """An agent killed while a camera is connecting also hangs up mid-handshake; libzmq reconnects then."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    hung_up = []
    stop = threading.Event()

    def hang_up_on_everyone() -> None:  # accepts the TCP connection, then closes it before any greeting
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            hung_up.append(1)
            conn.close()

    thread = threading.Thread(target=hang_up_on_everyone, daemon=True)
    thread.start()
    try:
        with FrameClient(f"tcp://127.0.0.1:{listener.getsockname()[1]}", socket_type="push") as frames:
            assert frames.wait_connected(1.0) is False  # no PeerRefused: libzmq keeps trying
            frames.send(images(1)[0])
            assert len(hung_up) >= 2  # it was hung up on, and reconnected
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_stream_camera_stops_with_the_fix_when_the_agent_expects_push(tmp_path):
    video = write_video(tmp_path / "clip.avi", 5)
    with make_service(tmp_path / "agent") as service:  # the default frame socket: PULL
        # --loop with no frame limit: only the refusal can end it
        result = subprocess.run(
            [sys.executable, str(TOOLS / "stream_camera.py"), str(video), "--endpoint", service.endpoints["frames"],
             "--socket", "pub", "--loop", "--fps", "50"],
            capture_output=True, text=True, timeout=60,
        )
        assert service.counters()["frames_received"] == 0
    assert result.returncode == 1, result.stderr
    assert "refused a PUB connection" in result.stderr and "frame socket is not a SUB" in result.stderr
    assert "--socket push" in result.stderr and "ingest.frame_socket: sub" in result.stderr
    assert "Traceback" not in result.stderr


def test_curve_on_one_side_only_is_refused_and_a_mismatch_under_curve_is_warned_about(tmp_path, caplog):
    from cl_agent.config import CurveSection
    from cl_agent.security import make_keypair

    server_public, server_secret = make_keypair(tmp_path / "server", "server")
    _, client_secret = make_keypair(tmp_path / "clients", "cam")
    curve = CurveSection(enabled=True, server_secret_key=str(server_secret), authorized_clients_dir=str(tmp_path / "clients"))
    keys = {"curve_secret_key": client_secret, "curve_server_key": server_public}
    with make_service(tmp_path / "secure", ingest={"curve": curve}) as secure, make_service(tmp_path / "plain") as plain:
        cases = [
            (secure, {}, "the agent uses CURVE and this client has no keys"),
            (plain, keys, "this client uses CURVE and the agent does not"),
        ]
        for service, kwargs, expected in cases:
            with FrameClient(service.endpoints["frames"], "cam", **kwargs) as frames:
                with pytest.raises(PeerRefused, match=expected):
                    frames.wait_connected(3.0)
        # Encrypted, a socket-type mismatch fails without detail and libzmq retries: one warning, no error.
        caplog.clear()  # only this client's warnings (a refused client above may have warned before its refusal)
        with caplog.at_level("WARNING", logger="cl_agent.client"):
            with FrameClient(secure.endpoints["frames"], "cam", socket_type="pub", **keys) as frames:
                # Not in the first second: under load a few such failures can come before a refusal.
                assert frames.wait_connected(0.5) is False
                assert not [r for r in caplog.records if r.name == "cl_agent.client"]
                assert frames.wait_connected(1.5) is False
                frames.send(images(1)[0])
        warnings = [r.getMessage() for r in caplog.records if r.name == "cl_agent.client"]
        assert len(warnings) == 1 and "failed without detail over" in warnings[0] and "socket-type mismatch" in warnings[0]
        with FrameClient(secure.endpoints["frames"], "cam", **keys) as frames:  # the right keys still connect
            assert frames.wait_connected(3.0)
