"""Camera-sized frames through InferenceClient and `cl-agent predict`: resized on the client as the server would.

A raw 1920x1080 RGB frame (6 220 800 bytes) is above the default ``wire.max_part_bytes``; the client
resizes it to the model's input with the server's own resize, so the model sees the same pixels as
when the server resizes the frame itself (sent here as a lossless PNG).
"""

import json

import cv2
import numpy as np
import pytest
import zmq
from typer.testing import CliRunner

from cl_agent.cli import app
from cl_agent.config import ExportSection, WireSection
from cl_agent.export import export_onnx
from cl_agent.inference import InferenceClient
from cl_agent.repository import ModelRepository
from cl_agent.server import Server
from cl_agent.wire import decode_reply, encode_message
import test_server
from test_server import CLASSES, SIZE, checked, publish, serve_section, tiny_net

onnx_models = test_server.onnx_models  # the fixture: two tiny exported models


def full_hd_frame(seed: int = 0) -> np.ndarray:
    """A (1080, 1920, 3) uint8 RGB frame: smooth shapes with fine detail, whose PNG fits the default part limit."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (27, 48, 3), dtype=np.uint8)
    frame = cv2.resize(coarse, (1920, 1080), interpolation=cv2.INTER_NEAREST)
    frame[::7, ::5] = rng.integers(0, 256, frame[::7, ::5].shape, dtype=np.uint8)  # detail an area resize must average
    return frame


def server_resizes(endpoint: str, frame: np.ndarray) -> dict[str, float]:
    """The class probabilities the server gives ``frame`` sent as a PNG (decoded and resized by the server)."""
    socket = zmq.Context.instance().socket(zmq.REQ)
    socket.connect(endpoint)
    try:
        request = encode_message("infer", "png-sender", 1, [frame], encoding="png", top_k=len(CLASSES))
        assert len(request[1]) <= WireSection().max_part_bytes  # the server takes it as it is
        socket.send_multipart(request)
        assert socket.poll(10_000)
        header = decode_reply(socket.recv_multipart(), WireSection())
    finally:
        socket.close(0)
    assert header["kind"] == "prediction", header
    (ranked,) = header["predictions"]
    return dict(ranked)


def assert_same_probabilities(got: list[tuple[str, float]], expected: dict[str, float]) -> None:
    assert sorted(name for name, _ in got) == sorted(expected)
    for name, probability in got:
        assert abs(probability - expected[name]) <= 1e-5, (name, probability, expected[name])


@pytest.fixture
def server(tmp_path, onnx_models):
    repo = ModelRepository(tmp_path / "models", "student")
    publish(repo, onnx_models[0])
    with Server(repo, serve_section()) as running:
        yield running


def test_a_full_hd_frame_sent_raw_gets_the_probabilities_of_the_server_resizing_it(server):
    frame = full_hd_frame()
    expected = server_resizes(server.endpoint, frame)
    with InferenceClient(server.endpoint, timeout_s=10) as client:  # raw: the default encoding
        one = client.predict([frame], top_k=len(CLASSES))
        batch = client.predict(np.stack([frame, full_hd_frame(1)]), top_k=len(CLASSES))
        assert client.status()["image_size"] == SIZE
    assert one.model_version == 1
    assert_same_probabilities(one.predictions[0], expected)
    assert_same_probabilities(batch.predictions[0], expected)
    assert_same_probabilities(batch.predictions[1], server_resizes(server.endpoint, full_hd_frame(1)))
    assert server.counters["errors"] == 0


def test_small_images_are_sent_as_they_are_without_asking_the_server_anything(server):
    small = np.random.default_rng(0).integers(0, 256, (2, 40, 30, 3), dtype=np.uint8)
    with InferenceClient(server.endpoint) as client:
        client.predict(small)
        client.predict(list(small))
    assert server.counters["requests"] == 2  # no status request: such images never needed the input size


def test_cl_agent_predict_answers_for_a_full_hd_photo(server, tmp_path):
    frame = full_hd_frame()
    folder = tmp_path / "bigshots"
    folder.mkdir()
    cv2.imwrite(str(folder / "hd.png"), frame[:, :, ::-1])  # OpenCV writes BGR
    result = CliRunner().invoke(app, ["predict", str(folder), "--endpoint", server.endpoint, "--json", "--top-k", str(len(CLASSES))])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["image"] == str(folder / "hd.png") and row["model_version"] == 1
    assert_same_probabilities([tuple(pair) for pair in row["predictions"]], server_resizes(server.endpoint, frame))


def test_after_a_swap_to_another_input_size_the_frame_is_resized_to_the_new_one(tmp_path, onnx_models):
    repo = ModelRepository(tmp_path / "models", "student")
    publish(repo, onnx_models[0])
    bigger = tmp_path / "tiny24.onnx"
    export_onnx([tiny_net(3)], bigger, image_size=24, mean=[0.5] * 3, std=[0.25] * 3, export=ExportSection())
    frame = full_hd_frame()
    with Server(repo, serve_section()) as server, InferenceClient(server.endpoint, timeout_s=10) as client:
        assert client.predict([frame]).model_version == 1  # learns the input size of version 1 (16)
        repo.publish(bigger, {"class_names": CLASSES, "image_size": 24})
        checked(server)
        assert server.version == 2
        result = client.predict([frame], top_k=len(CLASSES))  # resized to 16, answered by version 2: sent again at 24
        assert result.model_version == 2 and client.status()["image_size"] == 24
        assert_same_probabilities(result.predictions[0], server_resizes(server.endpoint, frame))
