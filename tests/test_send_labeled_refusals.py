"""tools/send_labeled.py against a live ingest service: a file the agent refuses is named, the rest of its batch stored."""

import subprocess
import sys
from pathlib import Path

import cv2

from cl_agent.experience import ExperienceStore
from ingest_support import images, make_service

TOOL = Path(__file__).resolve().parents[1] / "tools" / "send_labeled.py"


def test_a_truncated_jpeg_is_named_and_the_rest_of_its_batch_acked(tmp_path):
    root = tmp_path / "bad"
    for name, seed in (("cat", 0), ("dog", 1)):
        (root / name).mkdir(parents=True)
        for i, image in enumerate(images(2, 24, seed)):
            cv2.imwrite(str(root / name / f"{i}.jpg"), image)
    whole = cv2.imencode(".jpg", images(1, 24, 5)[0])[1].tobytes()
    truncated = root / "cat" / "trunc.jpg"
    truncated.write_bytes(whole[: len(whole) * 2 // 3])  # its header is intact: only decoding finds it
    with make_service(tmp_path / "agent") as service:
        result = subprocess.run(
            [sys.executable, str(TOOL), root, "--endpoint", service.endpoints["labeled"], "--batch", "8", "--end-experience"],
            capture_output=True, text=True, timeout=60,
        )
        counters = service.counters()
    assert result.returncode == 1, result.stderr
    assert "4 images acked, 1 refused, 0 unreadable" in result.stdout
    assert f"{truncated} refused: decode_failed: image 2:" in result.stderr
    assert f"the agent refused 1 file: {truncated}" in result.stderr
    assert counters["rejected"] == {"decode_failed": 1} and counters["labeled_images_acked"] == 4
    labeled, labels, _ = ExperienceStore(tmp_path / "agent").load(0).decode(16)
    assert labeled.shape == (4, 16, 16, 3) and sorted(labels.tolist()) == [0, 0, 1, 1]
