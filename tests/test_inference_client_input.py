"""InferenceClient input checks: top_k must be an integer >= 1; grey images are sent as RGB."""

import threading

import cv2
import numpy as np
import pytest
import zmq

from cl_agent.config import WireSection
from cl_agent.errors import CLAgentError
from cl_agent.inference import InferenceClient
from cl_agent.wire import decode_message, reply


@pytest.mark.parametrize("top_k", [2.7, 2.0, True, 0, -1, "3"])
def test_predict_refuses_a_top_k_that_is_not_an_integer_of_at_least_one(top_k):
    client = InferenceClient("tcp://127.0.0.1:9", timeout_s=0.1, retries=0)  # refused before anything is sent
    with pytest.raises(CLAgentError, match=f"top_k must be an integer >= 1, got {top_k!r}"):
        client.predict([np.zeros((8, 8, 3), np.uint8)], top_k=top_k)
    client.close()


def _one_reply_server(received: list, image_size: int = 16):
    """A ROUTER on a free loopback port answering status requests (a model input of ``image_size``) and then
    one infer request; the decoded images land in ``received``."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")

    def serve():
        identity, empty, *body = sock.recv_multipart()
        message = decode_message(body, WireSection())
        while message.kind == "status":
            sock.send_multipart([identity, empty, *reply("status", "server", message.seq, model_version=1, image_size=image_size)])
            identity, empty, *body = sock.recv_multipart()
            message = decode_message(body, WireSection())
        received.extend(message.image(i, WireSection()) for i in range(len(message.payloads)))
        predictions = [[["a", 1.0]] for _ in message.payloads]
        sock.send_multipart([identity, empty, *reply("prediction", "server", message.seq, predictions=predictions, model_version=1)])
        sock.close(linger=1000)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"tcp://127.0.0.1:{port}", thread


@pytest.mark.parametrize("encoding", ["raw", "jpeg"])
def test_grey_images_are_accepted_and_arrive_as_rgb(encoding):
    grey = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # (16, 16)
    expected = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB)
    for images in ([grey, grey[:, :, None]], np.stack([grey, grey])[..., None]):
        received: list = []
        endpoint, thread = _one_reply_server(received)
        with InferenceClient(endpoint, timeout_s=5.0, retries=0, encoding=encoding) as client:
            result = client.predict(images, top_k=1)
        thread.join(5)
        assert result.labels == ["a", "a"] and len(received) == 2
        for image in received:
            assert image.shape == (16, 16, 3)
            assert np.abs(image.astype(int) - expected).max() <= (0 if encoding == "raw" else 8)
