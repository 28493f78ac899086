"""The sender tools and clients at their edges: Ctrl-C in send_labeled.py (summary, --skip to resume) and in
stream_camera.py (a signal at any moment ends with the summary), a labeled or control client pointed at the
frame endpoint, label counts, symlinked class folders, loose images, --max-side, and a recording that waits
for a slow agent instead of dropping frames."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from cl_agent.client import AgentRefused, FrameClient, HandshakeWatch, LabeledClient, control_status
from cl_agent.errors import CLAgentError
from ingest_support import images, make_service

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tree(root: Path, per_class: int = 3, size: int = 16) -> Path:
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images(per_class, size, seed=c)):
            cv2.imwrite(str(root / name / f"{i}.jpg"), image)
    return root


@pytest.fixture
def router(bound_socket):
    """A stand-in for the agent's labeled endpoint that the test answers by hand: (endpoint, socket)."""
    return bound_socket(zmq.ROUTER)


def _next_message(sock: zmq.Socket) -> tuple[list[bytes], dict, list[bytes]]:
    assert sock.poll(30_000), "no message from the tool"
    identity, empty, header, *payloads = sock.recv_multipart()
    return [identity, empty], json.loads(header), payloads


def _ack(sock: zmq.Socket, route: list[bytes], header: dict) -> None:
    sock.send_multipart([*route, json.dumps({"kind": "ack", "seq": header["seq"], "accepted": len(header["labels"])}).encode()])


def test_ctrl_c_in_send_labeled_prints_what_was_acked_and_the_skip_that_resumes(tmp_path, router):
    endpoint, sock = router
    root = _tree(tmp_path / "data", per_class=4)
    listing = sorted(root.rglob("*.jpg"))  # the documented order: sorted by path
    command = [sys.executable, str(TOOLS / "send_labeled.py"), str(root), "--endpoint", endpoint, "--batch", "1",
               "--window", "1", "--timeout", "60"]
    tool = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3):
            _ack(sock, *_next_message(sock)[:2])
        _next_message(sock)  # the 4th: sent once the 3rd ack was taken, never answered
    finally:
        tool.send_signal(signal.SIGINT)
        out, err = tool.communicate(timeout=30)
    assert tool.returncode == 130, err
    assert "Traceback" not in err
    assert "interrupted: 3 images acked in 3 batches" in out
    assert "1 sent and not acked (not known to be stored), 4 not sent" in out
    assert "--skip 3" in out

    # the run again with --skip 3 sends exactly the rest, in the same order
    again = subprocess.Popen(command + ["--skip", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    received = []
    try:
        for _ in range(len(listing) - 3):
            route, header, payloads = _next_message(sock)
            received.append(payloads[0])
            _ack(sock, route, header)
    finally:
        out, err = again.communicate(timeout=30)
    assert again.returncode == 0, err
    assert received == [path.read_bytes() for path in listing[3:]]
    assert "5 images acked" in out


def test_send_labeled_help_names_the_order_and_skip():
    result = subprocess.run([sys.executable, str(TOOLS / "send_labeled.py"), "--help"], capture_output=True, text=True)
    words = " ".join(result.stdout.split())
    assert "--skip" in words and "sorted by path" in words and "--max-side" in words


def _load_stream_camera():
    spec = importlib.util.spec_from_file_location("stream_camera_under_test", TOOLS / "stream_camera.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pull(bound_socket):
    return bound_socket(zmq.PULL)


@pytest.mark.parametrize("moment", ["setting up", "streaming", "closing"])
def test_a_sigint_at_any_moment_of_stream_camera_ends_with_the_summary(tmp_path, pull, monkeypatch, capsys, moment):
    """A real SIGINT, delivered at the moment named: as the socket is set up, in the middle of the stream, and as
    the socket is closed after the source ran out (the moment the handler used to cut the clean-up short)."""
    endpoint, _ = pull
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.jpg"), np.full((16, 16, 3), 40 * i, np.uint8))
    tool = _load_stream_camera()

    def interrupt():
        os.kill(os.getpid(), signal.SIGINT)

    class Interrupted(FrameClient):
        def __init__(self, *args, **kwargs):
            if moment == "setting up":
                interrupt()
            super().__init__(*args, **kwargs)

        def send_encoded(self, *args, **kwargs):
            if moment == "streaming" and self.seq == 1:
                interrupt()
            return super().send_encoded(*args, **kwargs)

        def close(self, *args, **kwargs):
            if moment == "closing":
                interrupt()
            super().close(*args, **kwargs)

    monkeypatch.setattr(tool, "FrameClient", Interrupted)
    monkeypatch.setattr(sys, "argv", ["stream_camera.py", str(folder), "--endpoint", endpoint, "--progress", "0"])
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        code = tool.main()
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
    out = capsys.readouterr().out
    assert code == 0
    assert out.splitlines()[-1].split()[1:3] == ["frames", "sent,"]
    expected = {"setting up": 0, "streaming": 1, "closing": 3}[moment]
    assert int(out.splitlines()[-1].split()[0]) == expected


def test_a_monitor_read_cut_between_its_two_parts_does_not_break_the_next_read(pull):
    """A KeyboardInterrupt can come between the two receives of one monitor event: the next read must skip its
    second part, not fail on it."""
    endpoint, _ = pull
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.linger = 0
    watch = HandshakeWatch(sock, endpoint, curve=False, socket_type="push")
    try:
        sock.connect(endpoint)
        assert watch.monitor.poll(5000)
        watch.monitor.recv()  # the first part only, as an interrupted recv_multipart leaves it
        deadline = time.monotonic() + 5
        while not watch.connected and time.monotonic() < deadline:
            watch.monitor.poll(100)
            assert watch.read() is None
        assert watch.connected
    finally:
        watch.close()
        sock.close()


def test_a_labeled_or_control_client_at_the_frame_endpoint_is_refused_at_once(tmp_path):
    with make_service(tmp_path / "agent") as service:
        frames = service.endpoints["frames"]
        started = time.monotonic()
        with LabeledClient(frames, "robot", timeout_s=30, retries=3) as client:
            with pytest.raises(AgentRefused) as refused:
                client.send(images(1), ["cat"])
        assert time.monotonic() - started < 10  # the wait would be 4 x 30 s without the refusal
        message = str(refused.value)
        assert f"{frames} refused a DEALER connection" in message
        assert "not the agent's labeled endpoint" in message and "ingest.labeled_endpoint" in message
        assert "frame endpoint" in message
        with pytest.raises(AgentRefused, match="ingest.control_endpoint"):
            control_status(frames, timeout_s=30)
        # the labeled endpoint itself still works
        with LabeledClient(service.endpoints["labeled"], "robot") as client:
            assert client.send(images(2), ["cat", "dog"]).ok


def test_a_plain_pull_socket_refuses_a_labeled_client_within_two_seconds(pull):
    endpoint, _ = pull
    started = time.monotonic()
    with LabeledClient(endpoint, "robot", timeout_s=30, retries=0) as client:
        with pytest.raises(AgentRefused, match=f"{endpoint} refused a DEALER connection"):
            client.send(images(1), ["cat"])
    assert time.monotonic() - started < 2


def test_labels_must_match_the_images_before_anything_is_sent(router):
    endpoint, sock = router
    with LabeledClient(endpoint, "robot", timeout_s=0.5, retries=0) as client:
        with pytest.raises(CLAgentError, match="not sent: 1 label for 2 images"):
            client.send(images(2), ["cat"])
        with pytest.raises(CLAgentError, match="not sent: 3 labels for 2 images"):
            client.submit_encoded([b"a", b"b"], [[1, 1, 3]] * 2, ["cat", "dog", "owl"])
        assert client.in_flight == 0
    assert not sock.poll(100)


def _send_labeled(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOLS / "send_labeled.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=60)


def test_symlinked_class_folders_are_followed_and_loops_are_walked_once(tmp_path, router):
    data = _tree(tmp_path / "data")
    lab = tmp_path / "lab"
    lab.mkdir()
    (lab / "cat").symlink_to(data / "cat", target_is_directory=True)
    (lab / "dog").symlink_to(data / "dog", target_is_directory=True)
    (data / "cat" / "loop").symlink_to(data / "cat", target_is_directory=True)  # a loop: walked once
    tool = importlib.util.spec_from_file_location("send_labeled_under_test", TOOLS / "send_labeled.py")
    module = importlib.util.module_from_spec(tool)
    tool.loader.exec_module(module)
    warnings = []
    found = module.list_images(lab, warn=warnings.append)
    assert [label for _, label in found] == ["cat"] * 3 + ["dog"] * 3
    assert found == sorted(found) and warnings == []

    cv2.imwrite(str(lab / "x.jpg"), images(1)[0])
    cv2.imwrite(str(lab / "y.png"), images(1)[0])
    module.list_images(lab, warn=warnings.append)
    assert len(warnings) == 1 and "skipped 2 image files at the top of" in warnings[0] and str(lab / "x.jpg") in warnings[0]


def test_max_side_scales_large_images_down_keeping_the_aspect(tmp_path, router):
    endpoint, sock = router
    root = tmp_path / "data"
    (root / "cat").mkdir(parents=True)
    cv2.imwrite(str(root / "cat" / "wide.jpg"), np.zeros((60, 200, 3), np.uint8))
    cv2.imwrite(str(root / "cat" / "small.png"), np.zeros((10, 20, 3), np.uint8))
    tool = subprocess.Popen([sys.executable, str(TOOLS / "send_labeled.py"), str(root), "--endpoint", endpoint,
                             "--max-side", "50", "--batch", "1", "--window", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shapes = {}
    try:
        for _ in range(2):
            route, header, payloads = _next_message(sock)
            decoded = cv2.imdecode(np.frombuffer(payloads[0], np.uint8), cv2.IMREAD_COLOR)
            shapes[header["encoding"]] = (header["shapes"][0], list(decoded.shape))
            _ack(sock, route, header)
    finally:
        out, err = tool.communicate(timeout=30)
    assert tool.returncode == 0, err
    assert shapes["jpeg"] == ([15, 50, 3], [15, 50, 3])  # 60x200 -> 15x50
    assert shapes["png"] == ([10, 20, 3], [10, 20, 3])  # under the limit: as it is


FRAMES = 60


def test_a_folder_waits_for_a_slow_agent_where_a_live_source_would_drop(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(FRAMES):  # noise compresses badly: 40 MB of frames, far more than the socket buffers hold
        cv2.imwrite(str(folder / f"{i:03d}.jpg"), rng.integers(0, 256, (720, 720, 3), dtype=np.uint8))
    sock = zmq.Context.instance().socket(zmq.PULL)
    sock.linger = 0
    sock.rcvhwm = 1
    sock.setsockopt(zmq.RCVBUF, 4096)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    command = [sys.executable, str(TOOLS / "stream_camera.py"), str(folder), "--endpoint", f"tcp://127.0.0.1:{port}",
               "--progress", "0", "--linger", "0"]
    try:
        # --busy drop (a live camera's default): nobody reads, so the socket fills and frames are dropped
        dropping = subprocess.run(command + ["--busy", "drop"], capture_output=True, text=True, timeout=60)
        assert dropping.returncode == 0, dropping.stderr
        assert int(dropping.stdout.split(" dropped")[0].split()[-1]) > 0, dropping.stdout
        while sock.poll(200):
            sock.recv_multipart()
        # the default for a folder: the tool waits for the reader, and every frame arrives
        waiting = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        received = 0
        try:
            while received < FRAMES and sock.poll(30_000):
                sock.recv_multipart()
                received += 1
        finally:
            out, err = waiting.communicate(timeout=30)
    finally:
        sock.close()
    assert waiting.returncode == 0, err
    assert received == FRAMES and out.startswith(f"{FRAMES} frames sent, 0 dropped"), out
