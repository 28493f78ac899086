"""`cl-agent predict`: image files through a running server, as an operator checks a deployment."""

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cl_agent.cli import app
from cl_agent.inference import InferenceClient
from cl_agent.repository import ModelRepository
from cl_agent.server import Server
from test_server import CLASSES, SIZE, onnx_models, publish, serve_section  # noqa: F401  (onnx_models is a fixture)


@pytest.fixture
def server(tmp_path, onnx_models):  # noqa: F811
    repo = ModelRepository(tmp_path / "models", "student")
    publish(repo, onnx_models[0])
    with Server(repo, serve_section()) as running:
        yield running


def test_predict_prints_each_image_with_the_version_and_reports_unreadable_ones(server, tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pictures = {name: rng.integers(0, 256, (40, 30, 3), dtype=np.uint8) for name in ("a.png", "b.png")}
    for name, picture in pictures.items():
        cv2.imwrite(str(folder / name), picture)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image: skipped")

    result = CliRunner().invoke(app, ["predict", str(folder), "--endpoint", server.endpoint, "--json", "--top-k", "2"])
    assert result.exit_code == 1, result.output  # one image could not be read
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(folder / "a.png"), str(folder / "b.png")]
    with InferenceClient(server.endpoint) as client:
        for row, picture in zip(rows, pictures.values()):
            expected = client.predict(picture[None, :, :, ::-1], top_k=2)  # written as BGR, read back as RGB
            assert row["model_version"] == 1 and row["model"] == "student"
            assert [name for name, _ in row["predictions"]] == [name for name, _ in expected.predictions[0]]
            assert all(name in CLASSES for name, _ in row["predictions"])
    assert "broken.jpg: not an image OpenCV can read" in result.stderr

    plain = CliRunner().invoke(app, ["predict", str(folder / "a.png"), "--endpoint", server.endpoint])
    assert plain.exit_code == 0 and plain.stdout.startswith(f"{folder / 'a.png'}  v1  ")
    status = CliRunner().invoke(app, ["predict", "--status", "--endpoint", server.endpoint])
    assert status.exit_code == 0 and json.loads(status.stdout)["model_version"] == 1


def test_predict_says_what_is_wrong(tmp_path):
    runner = CliRunner()
    nothing = runner.invoke(app, ["predict", "--endpoint", "tcp://127.0.0.1:9"])
    assert nothing.exit_code == 2 and "at least one image" in nothing.output
    bad = runner.invoke(app, ["predict", str(tmp_path), "--endpoint", "nowhere"])
    assert bad.exit_code == 2 and "expected an endpoint" in bad.output
    missing = runner.invoke(app, ["predict", str(tmp_path / "none.jpg"), "--endpoint", "tcp://127.0.0.1:9"])
    assert missing.exit_code == 1 and "none.jpg: no such file or folder" in missing.output
    empty = runner.invoke(app, ["predict", str(tmp_path), "--endpoint", "tcp://127.0.0.1:9"])
    assert empty.exit_code == 1 and "holds no image files" in empty.output
    cv2.imwrite(str(tmp_path / "x.png"), np.zeros((8, 8, 3), np.uint8))
    silent = runner.invoke(app, ["predict", str(tmp_path), "--endpoint", "tcp://127.0.0.1:9", "--timeout", "0.2"])
    assert silent.exit_code == 1 and "timeout" in silent.output  # no server there: one clear error, not one per image


def test_classes_never_trained_on_are_left_out_of_the_printed_line(tmp_path):
    # The exported graph gives classes never trained on a probability of 0: a column of "0.000" says nothing.
    import torch

    from cl_agent.config import ExportSection
    from cl_agent.export import export_onnx
    from cl_agent.student import SeenClassMask
    from test_server import tiny_net

    model = tmp_path / "masked.onnx"
    masked = SeenClassMask(tiny_net(0), torch.tensor([True, False, True])).eval()
    export_onnx([masked], model, image_size=SIZE, mean=[0.5] * 3, std=[0.25] * 3, export=ExportSection())
    repo = ModelRepository(tmp_path / "models", "student")
    publish(repo, model)
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    with Server(repo, serve_section()) as running:
        plain = CliRunner().invoke(app, ["predict", str(image), "--endpoint", running.endpoint, "--top-k", "3"])
        as_json = CliRunner().invoke(app, ["predict", str(image), "--endpoint", running.endpoint, "--top-k", "3", "--json"])
    assert plain.exit_code == 0 and as_json.exit_code == 0
    shown = plain.stdout.split("  v1  ")[1].split("  ")
    assert sorted(entry.split()[0] for entry in shown) == ["cat", "cup"]  # "dog" (never trained) is not printed
    # the server leaves it out of the reply itself, so the JSON (and every client) has only the known classes
    assert sorted(name for name, _ in json.loads(as_json.stdout)["predictions"]) == ["cat", "cup"]
