"""tools/stream_camera.py waits for the agent before the first frame and reports only what a live connection took."""

import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cl_agent.client import FrameClient, NotConnected
from ingest_support import free_port, images, make_service, wait_until, write_video

TOOL = Path(__file__).resolve().parents[1] / "tools" / "stream_camera.py"


def _stream(video: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), str(video), *map(str, args)], capture_output=True, text=True, timeout=60)


def _sent(stdout: str) -> int:
    return int(stdout.split(" frames sent")[0].split()[-1])


def test_a_refused_socket_type_stops_before_any_frame_is_counted(tmp_path):
    video = write_video(tmp_path / "clip.avi", 30)
    with make_service(tmp_path / "agent") as service:  # frame socket PULL; labeled socket ROUTER
        wrong_type = _stream(video, "--endpoint", service.endpoints["frames"], "--socket", "pub")
        labeled_port = _stream(video, "--endpoint", service.endpoints["labeled"])
        assert service.counters()["frames_received"] == 0
    for result, ours in [(wrong_type, "PUB"), (labeled_port, "PUSH")]:
        assert result.returncode == 1, (result.stdout, result.stderr)
        assert "frames sent" not in result.stdout, result.stdout
        assert f"refused a {ours} connection" in result.stderr and "Traceback" not in result.stderr
    assert "not the agent's frame endpoint" in labeled_port.stderr and service.endpoints["labeled"] in labeled_port.stderr


def test_no_agent_listening_is_an_error_naming_the_endpoint(tmp_path):
    video = write_video(tmp_path / "clip.avi", 30)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    start = time.monotonic()
    result = _stream(video, "--endpoint", endpoint, "--connect-timeout", "0.5")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert time.monotonic() - start < 30
    assert "frames sent" not in result.stdout
    assert f"no connection to {endpoint} within 0.5 s" in result.stderr and "nothing accepted a connection" in result.stderr


@pytest.mark.parametrize("camera, agent", [("push", "pull"), ("pub", "sub")])
def test_every_frame_reported_sent_reaches_the_agent(tmp_path, camera, agent):
    video = write_video(tmp_path / "clip.avi", 30)
    with make_service(tmp_path / "agent", ingest={"frame_socket": agent}) as service:
        # no frame-rate cap: the source outruns the agent, so some frames may be dropped, none lost unreported
        result = _stream(video, "--endpoint", service.endpoints["frames"], "--socket", camera)
        assert result.returncode == 0, result.stderr
        sent = _sent(result.stdout)
        assert wait_until(lambda: service.counters()["frames_received"] >= sent, timeout_s=5)
        time.sleep(0.2)
        assert service.counters()["frames_received"] == sent >= 1
    dropped = int(result.stdout.split(" dropped")[0].split()[-1])
    assert sent + dropped == 30 and result.stderr == ""


def test_frames_queued_while_the_agent_is_away_are_not_reported_sent(tmp_path):
    video = write_video(tmp_path / "clip.avi", 5)
    service = make_service(tmp_path / "agent").start()
    camera = subprocess.Popen(
        [sys.executable, str(TOOL), str(video), "--endpoint", service.endpoints["frames"], "--loop", "--fps", "50", "--linger", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert wait_until(lambda: service.counters()["frames_received"] >= 10)
        # Pause the camera until the agent has taken every frame already on its way, so that frames lost
        # in flight at the stop (sent, never received) do not depend on how loaded the machine is.
        camera.send_signal(signal.SIGSTOP)
        try:
            _settled(lambda: service.counters()["frames_received"])
            service.stop()
        finally:
            camera.send_signal(signal.SIGCONT)
        received = service.counters()["frames_received"]
        time.sleep(1.0)  # frames keep coming from the source, with nobody to take them
    finally:
        camera.send_signal(signal.SIGINT)
        out, err = camera.communicate(timeout=30)
    assert camera.returncode == 0, err
    assert "were queued while the connection" in err and "was down at the end" in err
    queued = int(err.split(" more frames were queued")[0].split()[-1])
    assert queued >= 8, err  # up to the socket's queue (16); the rest are dropped
    # A frame or two sent as the camera resumes, before it sees the connection gone, are lost on the wire;
    # the queued ones are not counted as sent (counting them would add the 8 or more above).
    assert received <= _sent(out) <= received + 5, (out, err)


def _settled(read, quiet_s: float = 0.3, timeout_s: float = 10.0):
    """Poll ``read()`` until it has not changed for ``quiet_s``; its last value."""
    last, since = read(), time.monotonic()
    deadline = since + timeout_s
    while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
        time.sleep(0.05)
        value = read()
        if value != last:
            last, since = value, time.monotonic()
    return last


def test_require_connected_names_what_it_saw(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    with FrameClient(endpoint) as frames:
        frames.send(images(1)[0])  # taken by the socket, not by an agent
        assert frames.sent == frames.sent_unconnected == 1
        with pytest.raises(NotConnected, match="nothing accepted a connection"):
            frames.require_connected(0.2)

    listener = socket.socket()  # accepts the TCP connection and never says a word
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    held = []
    thread = threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True)
    thread.start()
    try:
        with FrameClient(f"tcp://127.0.0.1:{listener.getsockname()[1]}") as frames:
            with pytest.raises(NotConnected, match="no ZeroMQ handshake finished"):
                frames.require_connected(0.5)
    finally:
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()

    with make_service(tmp_path / "agent", ingest={"frame_socket": "sub"}) as service:
        with FrameClient(service.endpoints["frames"], socket_type="pub") as frames:
            frames.require_connected(5.0)  # handshake done and the agent's subscription arrived
            assert frames.send(images(1)[0]) and frames.sent_unconnected == 0
            assert wait_until(lambda: service.counters()["frames_accepted"] == 1)
