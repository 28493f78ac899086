"""`cl-agent predict` on a `<root>/<class>/<image>` tree: every image under the folder, sorted by path."""

import json

import cv2
import numpy as np
from typer.testing import CliRunner

from cl_agent.cli import app
from cl_agent.inference import image_files
from test_predict_command import server  # noqa: F401  (fixtures)
from test_server import onnx_models  # noqa: F401


def picture(path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8))


def test_predict_reads_images_in_subfolders_sorted_by_path(server, tmp_path):  # noqa: F811
    root = tmp_path / "imgs"
    picture(root / "dog" / "b.png", 0)
    picture(root / "cat" / "z.jpg", 1)
    picture(root / "cat" / "a.png", 2)
    picture(root / "cat" / "kittens" / "c.png", 3)
    picture(root / "top.png", 4)
    picture(root / ".thumbnails" / "t.png", 5)  # hidden: skipped
    (root / "cat" / "notes.txt").write_text("not an image: skipped")

    result = CliRunner().invoke(app, ["predict", str(root), "--endpoint", server.endpoint, "--json"])
    assert result.exit_code == 0, result.output
    seen = [json.loads(line)["image"] for line in result.stdout.splitlines()]
    expected = ["cat/a.png", "cat/kittens/c.png", "cat/z.jpg", "dog/b.png", "top.png"]
    assert seen == [str(root / name) for name in expected]


def test_a_tree_without_images_says_subfolders_were_searched(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "notes.txt").write_text("x")
    result = CliRunner().invoke(app, ["predict", str(tmp_path), "--endpoint", "tcp://127.0.0.1:9"])
    assert result.exit_code == 1 and "holds no image files" in result.output and "subfolders" in result.output


def test_files_named_are_kept_in_the_order_given(tmp_path):
    for name in ("z.jpg", "b/1.png", "a.jpg"):
        picture(tmp_path / name, 0)
    named = [tmp_path / "z.jpg", tmp_path / "b", tmp_path / "a.jpg"]
    assert image_files(named) == [tmp_path / "z.jpg", tmp_path / "b" / "1.png", tmp_path / "a.jpg"]
