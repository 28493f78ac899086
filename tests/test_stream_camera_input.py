"""tools/stream_camera.py sources and run-time reporting: an image folder, OpenCV's numbered-image pattern,
progress lines, SIGTERM, and what a refused endpoint turns out to be."""

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import zmq

from ingest_support import make_service

TOOL = Path(__file__).resolve().parents[1] / "tools" / "stream_camera.py"


def _run(source, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), str(source), *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def pull(bound_socket):
    """A real PULL socket on a free loopback port: (endpoint, socket)."""
    return bound_socket(zmq.PULL)


def _received(sock: zmq.Socket, wait_s: float = 5.0) -> list[np.ndarray]:
    """Every frame waiting on ``sock`` (the first within ``wait_s``), decoded from its JPEG (BGR)."""
    images = []
    while sock.poll(int(wait_s * 1000) if not images else 300):
        header, payload = sock.recv_multipart()
        assert json.loads(header)["kind"] == "frame"
        images.append(cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR))
    return images


def _grey_levels(images: list[np.ndarray]) -> list[int]:
    return [int(round(image.mean() / 10)) * 10 for image in images]


def test_a_folder_of_images_is_streamed_in_name_order(tmp_path, pull):
    endpoint, sock = pull
    folder = tmp_path / "frames"
    folder.mkdir()
    # written out of order, mixed formats and case; the level in each image says which file it came from
    for name, level in [("c.png", 30), ("a.jpg", 10), ("b.JPG", 20), ("d.bmp", 40), ("e.webp", 50)]:
        assert cv2.imwrite(str(folder / name), np.full((24, 32, 3), level, np.uint8))
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    result = _run(folder, "--endpoint", endpoint)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("5 frames sent, 0 dropped")
    assert "broken.jpg: not an image OpenCV can read; skipped" in result.stderr
    assert _grey_levels(_received(sock)) == [10, 20, 30, 40, 50]


def test_a_numbered_image_pattern_is_streamed(tmp_path, pull):
    endpoint, sock = pull
    for i, level in enumerate([60, 70, 80]):
        cv2.imwrite(str(tmp_path / f"img_{i:06d}.jpg"), np.full((16, 16, 3), level, np.uint8))
    result = _run(tmp_path / "img_%06d.jpg", "--endpoint", endpoint)
    if "OpenCV cannot open" in result.stderr:
        pytest.skip("this OpenCV build has no image-sequence reader")
    assert result.returncode == 0, result.stderr
    assert _grey_levels(_received(sock)) == [60, 70, 80]


def test_bad_sources_say_what_is_accepted(tmp_path, pull):
    endpoint, _ = pull
    (tmp_path / "empty").mkdir()
    empty = _run(tmp_path / "empty", "--endpoint", endpoint)
    assert empty.returncode == 2 and "holds no images (.jpeg, .jpg, .png, .bmp, .webp)" in empty.stderr
    missing = _run(tmp_path / "none.mp4", "--endpoint", endpoint)
    assert missing.returncode == 2 and "a folder of images" in missing.stderr and "img_%06d.jpg" in missing.stderr
    assert f"file or folder not found: '{tmp_path / 'none.mp4'}'" in missing.stderr


def test_a_folder_that_does_not_exist_is_named_not_found(tmp_path, pull):
    endpoint, _ = pull
    result = subprocess.run([sys.executable, str(TOOL), "nosuch/", "--endpoint", endpoint], capture_output=True,
                            text=True, timeout=60, cwd=tmp_path)
    assert result.returncode == 2 and "folder not found: 'nosuch/'" in result.stderr
    assert "OpenCV cannot open" not in result.stderr


def test_camera_indexes_urls_and_patterns_are_left_to_opencv(tmp_path):
    spec = importlib.util.spec_from_file_location("stream_camera_sources", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for source in ("0", "rtsp://camera.local/stream", str(tmp_path / "img_%06d.jpg"),
                   "videotestsrc ! videoconvert ! appsink", str(tmp_path)):
        assert tool.missing_path(source) is None, source
    assert tool.missing_path(str(tmp_path / "nosuch") + "/").startswith("folder not found")
    assert tool.missing_path(str(tmp_path / "clip.mp4")).startswith("file or folder not found")


def test_progress_lines_while_streaming_and_sigterm_ends_with_the_summary(tmp_path, pull):
    endpoint, sock = pull
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.jpg"), np.full((16, 16, 3), 50 * i, np.uint8))
    camera = subprocess.Popen(
        [sys.executable, str(TOOL), str(folder), "--endpoint", endpoint, "--loop", "--fps", "40", "--progress", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        received = 0
        deadline = time.monotonic() + 20
        while received < 30 and time.monotonic() < deadline:
            if sock.poll(100):
                sock.recv_multipart()
                received += 1
        assert received >= 30
    finally:
        camera.send_signal(signal.SIGTERM)  # as systemd and docker stop it
        out, err = camera.communicate(timeout=30)
    assert camera.returncode == 0, err
    lines = out.splitlines()
    progress = [line for line in lines if "queued while the connection was down" in line]
    assert len(progress) >= 2, out  # about one every 0.2 s over 0.75 s or more
    assert all(line.split()[1:3] == ["frames", "sent,"] and " dropped, " in line for line in progress)
    assert lines[-1].split()[1:3] == ["frames", "sent,"] and "frames/s" in lines[-1]  # the summary comes last
    assert int(lines[-1].split()[0]) >= 30 and "Traceback" not in err


def test_a_refused_connection_names_what_answers_or_puts_the_endpoint_first(tmp_path):
    source = tmp_path / "frames"
    source.mkdir()
    cv2.imwrite(str(source / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    with make_service(tmp_path / "agent") as service:  # frame socket PULL
        control = _run(source, "--endpoint", service.endpoints["control"])
        wrong_type = _run(source, "--endpoint", service.endpoints["frames"], "--socket", "pub")
        assert service.counters()["frames_received"] == 0
    assert control.returncode == 1
    assert "it answers as the agent's control endpoint (ingest.control_endpoint" in control.stderr
    assert "point --endpoint at ingest.frame_endpoint (default port 5556)" in control.stderr
    # a PULL says nothing back: the wrong endpoint comes first, then the socket-type mismatch
    message = wrong_type.stderr
    assert wrong_type.returncode == 1 and "refused a PUB connection" in message
    assert message.index("may not be the agent's frame endpoint (ingest.frame_endpoint, default port 5556") < message.index("--socket push")


def test_a_frame_socket_in_router_mode_is_named(tmp_path):
    source = tmp_path / "frames"
    source.mkdir()
    cv2.imwrite(str(source / "a.jpg"), np.zeros((8, 8, 3), np.uint8))
    with make_service(tmp_path / "agent", ingest={"frame_socket": "router"}) as service:
        result = _run(source, "--endpoint", service.endpoints["frames"], "--connect-timeout", "3")
    assert result.returncode == 1
    assert "ingest.frame_socket: router" in result.stderr and "set ingest.frame_socket: pull" in result.stderr
