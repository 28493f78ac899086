"""Frames from an unmodified imagezmq ImageSender: REQ/REP (frame_socket: router) and PUB/SUB (frame_socket: sub)."""

import cv2
import numpy as np
import pytest

from cl_agent.experience import Sample, decode_sample
from ingest_support import free_port, make_service, wait_until

imagezmq = pytest.importorskip("imagezmq")


def _bgr_frame(h=48, w=64):
    frame = np.zeros((h, w, 3), np.uint8)
    frame[..., 2] = 255  # red, in OpenCV's BGR order
    return frame


def _decoded(frame_record):
    return decode_sample(Sample(frame_record.payload, frame_record.encoding, frame_record.shape, frame_record.color), 16)


def test_req_rep_sender_raw_and_jpeg(tmp_path):
    with make_service(tmp_path, ingest={"frame_socket": "router"}, reservoir={"capacity": 10}) as service:
        sender = imagezmq.ImageSender(connect_to=service.endpoints["frames"])
        assert sender.send_image("camera-1", _bgr_frame()) == b"OK"
        grey = np.full((20, 30), 77, np.uint8)
        assert sender.send_image("camera-1", grey) == b"OK"
        ok, jpg = cv2.imencode(".jpg", _bgr_frame(), [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert sender.send_jpg("camera-2", jpg) == b"OK"
        # A frame past the size limits is refused, and the sender still gets its reply.
        huge = np.zeros((5000, 10, 3), np.uint8)
        assert sender.send_image("camera-1", huge) == b"ERROR image_too_large"
        sender.close()
        counters = service.counters()
        frames = service.reservoir.sample(10)
    assert counters["frames_accepted"] == 3 and counters["rejected"] == {"image_too_large": 1}
    assert sorted(f.source for f in frames) == ["camera-1", "camera-1", "camera-2"]
    for frame in frames:
        image = _decoded(frame)
        if frame.shape[2] == 1:
            assert image.min() == image.max() == 77
        else:  # red stays red: BGR arrays and JPEGs come back as RGB
            assert image[..., 0].mean() > 240 and image[..., 2].mean() < 15, frame.encoding


def test_pub_sub_sender(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"
    sender = imagezmq.ImageSender(connect_to=address, REQ_REP=False)  # binds a PUB socket
    service = make_service(tmp_path, ingest={"frame_socket": "sub", "frame_endpoint": "", "frame_connect": [address]})
    with service:
        ok, jpg = cv2.imencode(".jpg", _bgr_frame())

        def delivered():
            sender.send_image("pub-cam", _bgr_frame())  # PUB drops until the subscription arrives
            sender.send_jpg("pub-cam", jpg)
            return service.counters()["frames_accepted"] >= 4

        assert wait_until(delivered, timeout_s=5, interval_s=0.05)
        encodings = {f.encoding for f in service.reservoir.sample(100)}
    sender.close()
    assert encodings == {"raw", "jpeg"}
