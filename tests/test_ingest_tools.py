"""tools/send_labeled.py (folder and tar) and tools/stream_camera.py (video file) against a live ingest service."""

import subprocess
import sys
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest

from cl_agent.experience import ExperienceStore
from ingest_support import images, make_service, wait_until, write_video

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def _tree(root: Path) -> Path:
    for c, name in enumerate(["cat", "dog", "owl"]):
        folder = root / "train" / name
        folder.mkdir(parents=True)
        for i, image in enumerate(images(4, 20, seed=c)):
            cv2.imwrite(str(folder / f"{i}.jpg"), image)
        cv2.imwrite(str(folder / "extra.png"), images(1, 12, seed=9)[0])
        (folder / "notes.txt").write_text("not an image")
    return root / "train"


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("as_tar", [False, True])
def test_send_labeled_from_folder_or_tar(tmp_path, as_tar):
    root = _tree(tmp_path / "data")
    if as_tar:
        with tarfile.open(tmp_path / "data.tar", "w") as tar:
            tar.add(root, arcname="train")
        root = tmp_path / "data.tar"
    with make_service(tmp_path / "agent") as service:
        result = _run(TOOLS / "send_labeled.py", root, "--endpoint", service.endpoints["labeled"], "--batch", "4", "--end-experience")
        assert result.returncode == 0, result.stderr
        assert "15 images acked, 0 refused" in result.stdout
    labeled, labels, _ = ExperienceStore(tmp_path / "agent").load(0).decode(16)
    assert labeled.shape == (15, 16, 16, 3)
    assert sorted(np.bincount(labels).tolist()) == [5, 5, 5]
    assert service.labels.names == ["cat", "dog", "owl"]


def test_stream_camera_from_a_video_file(tmp_path):
    video = write_video(tmp_path / "clip.avi", 10, 160, 120)
    with make_service(tmp_path / "agent") as service:
        result = _run(TOOLS / "stream_camera.py", video, "--endpoint", service.endpoints["frames"], "--width", "64",
                      "--fps", "200", "--loop", "--max-frames", "25", "--sender", "clip")
        assert result.returncode == 0, result.stderr
        assert wait_until(lambda: service.counters()["frames_accepted"] >= 1)
        frames = service.reservoir.sample(100)
        sent = int(result.stdout.split()[0])
    assert sent >= 1 and service.counters()["frames_accepted"] == sent
    assert all(f.shape == (48, 64, 3) and f.encoding == "jpeg" and f.source == "clip" for f in frames)


def _usage_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "images acked" not in result.stdout
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_send_labeled_rejects_bad_arguments_before_sending(tmp_path):
    from cl_agent.security import make_keypair

    root = _tree(tmp_path / "data")
    public, secret = make_keypair(tmp_path / "keys", "robot")
    (tmp_path / "plain.txt").write_text("not a tar")
    tool = TOOLS / "send_labeled.py"
    # nothing listens on this endpoint: every case must fail before any send
    endpoint = ["--endpoint", "tcp://127.0.0.1:9"]
    _usage_error(_run(tool, tmp_path / "no" / "such", *endpoint), str(tmp_path / "no" / "such"), "not found")
    _usage_error(_run(tool, tmp_path / "plain.txt", *endpoint), "plain.txt", "neither a folder nor a tar")
    _usage_error(_run(tool, root, *endpoint, "--classes", "purple,cat"), "'purple'", "cat, dog, owl")
    _usage_error(_run(tool, root, *endpoint, "--curve-secret", public, "--curve-server", public), str(public), "secret")
    _usage_error(_run(tool, root, *endpoint, "--curve-secret", secret), "--curve-server")
    _usage_error(_run(tool, root, "--endpoint", "nowhere"), "'nowhere'")
    for option, value in [("--batch", "0"), ("--window", "0"), ("--timeout", "0"), ("--retries", "-1"), ("--limit", "-3")]:
        _usage_error(_run(tool, root, *endpoint, option, value), option, value)


def _video(path: Path) -> Path:
    return write_video(path, 3)


def test_stream_camera_rejects_bad_arguments_without_a_traceback(tmp_path):
    from cl_agent.security import make_keypair

    video = _video(tmp_path / "clip.avi")
    public, _ = make_keypair(tmp_path / "keys", "camera")
    tool = TOOLS / "stream_camera.py"
    endpoint = ["--endpoint", "tcp://127.0.0.1:9"]
    _usage_error(_run(tool, tmp_path / "missing.mp4", *endpoint), "missing.mp4", "not found")
    _usage_error(_run(tool, video, "--endpoint", "nowhere"), "'nowhere'")
    _usage_error(_run(tool, video, *endpoint, "--curve-secret", public), "--curve-server")
    _usage_error(_run(tool, video, *endpoint, "--curve-secret", public, "--curve-server", public), str(public), "secret")
    _usage_error(_run(tool, video, *endpoint, "--curve-secret", tmp_path / "nokey", "--curve-server", public), "nokey", "not found")
    for option, value in [("--width", "-5"), ("--height", "x"), ("--quality", "0"), ("--quality", "101"), ("--fps", "-1"), ("--max-frames", "-2")]:
        _usage_error(_run(tool, video, *endpoint, option, value), option, value)


def test_send_labeled_names_an_unreadable_tar(tmp_path):
    root = _tree(tmp_path / "data")
    with tarfile.open(tmp_path / "data.tar", "w") as tar:
        tar.add(root, arcname="train")
    (tmp_path / "cut.tar").write_bytes((tmp_path / "data.tar").read_bytes()[:3000])
    _usage_error(_run(TOOLS / "send_labeled.py", tmp_path / "cut.tar", "--endpoint", "tcp://127.0.0.1:9"), "cut.tar")


def test_make_config_writes_checks_and_refuses_a_missing_folder(tmp_path):
    tool = TOOLS / "make_config.py"
    robot = TOOLS.parent / "configs" / "robot.yaml"
    help_text = _run(tool, "--help")
    assert help_text.returncode == 0 and "--check" in help_text.stdout and "cl-agent configuration" not in help_text.stdout
    assert _run(tool, "--check", robot).returncode == 0, "configs/robot.yaml is stale: python tools/make_config.py --out configs/robot.yaml"
    written = _run(tool, "--out", tmp_path / "robot.yaml")
    assert written.returncode == 0, written.stderr
    assert (tmp_path / "robot.yaml").read_text() == robot.read_text() == _run(tool).stdout
    (tmp_path / "old.yaml").write_text(robot.read_text().replace("max_batch: 32", "max_batch: 16"))
    stale = _run(tool, "--check", tmp_path / "old.yaml")
    assert stale.returncode == 1 and "differs" in stale.stderr
    _usage_error(_run(tool, "--out", tmp_path / "no" / "such" / "robot.yaml"), str(tmp_path / "no" / "such"), "does not exist")
    _usage_error(_run(tool, "--check", tmp_path / "absent.yaml"), "absent.yaml")


def test_send_labeled_names_unreadable_files_and_a_silent_endpoint(tmp_path):
    from cl_agent.client import AgentUnavailable, LabeledClient
    from ingest_support import free_port

    root = _tree(tmp_path / "data")
    broken = [root / "cat" / f"broken{i}.jpg" for i in range(7)]
    for path in broken:
        path.write_bytes(b"not a jpeg")
    tool = TOOLS / "send_labeled.py"
    with make_service(tmp_path / "agent") as service:
        result = _run(tool, root, "--endpoint", service.endpoints["labeled"])
        assert result.returncode == 0, result.stderr
        assert "15 images acked, 0 refused, 7 unreadable" in result.stdout
        assert "skipped 7 files" in result.stderr and str(broken[0]) in result.stderr and "and 2 more" in result.stderr
        # the frame port (PULL) hangs up on a DEALER in the handshake: refused at once, not after the retries
        frames = _run(tool, root, "--endpoint", service.endpoints["frames"], "--timeout", "30", "--retries", "1")
        # a port where nothing listens: no reply
        silent = _run(tool, root, "--endpoint", f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.2", "--retries", "1")
    assert frames.returncode == 1
    assert f"{service.endpoints['frames']} refused a DEALER connection" in frames.stderr
    assert "ingest.labeled_endpoint" in frames.stderr and "nothing is known to be stored" in frames.stderr
    assert "resent" not in frames.stderr and "Traceback" not in frames.stderr
    assert silent.returncode == 1 and "(2 tries of 0.2 s each)" in silent.stderr
    assert "ingest.labeled_endpoint" in silent.stderr and "resent" not in silent.stderr and "Traceback" not in silent.stderr

    once = _run(tool, root, "--endpoint", "localhost:5555")
    _usage_error(once, "'localhost:5555'", "tcp://")
    assert once.stderr.count("localhost:5555") == 1

    with LabeledClient(f"tcp://127.0.0.1:{free_port()}", timeout_s=0.1, retries=0) as client:
        with pytest.raises(AgentUnavailable, match=r"after 0 retries \(1 try of 0.1 s each; 1 message still pending"):
            client.send(images(1), ["cat"])


@pytest.mark.parametrize("tool", ["send_labeled.py", "stream_camera.py"])
def test_help_describes_every_option_with_its_default(tool):
    import re

    result = _run(TOOLS / tool, "--help")
    assert result.returncode == 0, result.stderr
    options_text = result.stdout.split("options:")[1]
    # an entry starts at a line "  --name ..." and runs until the next such line or a blank line
    entries = re.findall(r"^  (--[\w-]+.*?)(?=^  -|^\s*$)", options_text, flags=re.M | re.S)
    names = {entry.split()[0] for entry in entries}
    assert names >= {"--endpoint", "--curve-secret", "--curve-server", "--sender"}, names
    for entry in entries:
        if entry.startswith("--help"):
            continue
        words = " ".join(entry.split())
        assert "(default: " in words, words
        description = re.sub(r"^--[\w-]+( [A-Z_{},a-z]+)?", "", words).split("(default: ")[0].strip()
        assert len(description) > 5, words
