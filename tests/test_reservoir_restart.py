"""The unlabeled frames survive a clean stop and start: saved to the workdir, restored, damage ignored."""

import io
import logging

import numpy as np

from cl_agent.client import FrameClient
from cl_agent.reservoir import SAVED_FILE, Frame, Reservoir
from ingest_support import images, make_service, wait_until


def frame(i, source="cam"):
    return Frame(i.to_bytes(4, "little"), "jpeg", (4, 4, 3), "rgb", source)


def held(reservoir):
    return sorted((bytes(f.payload), f.encoding, tuple(f.shape), f.color, f.source) for f in reservoir.sample(10**6))


def send_frames(endpoint, sender, count, seed):
    with FrameClient(endpoint, sender) as client:
        for image in images(count, 16, seed):
            while not client.send(image):
                pass


def test_frames_and_per_source_counts_survive_a_stop_and_start_of_the_ingest_service(tmp_path):
    settings = {"capacity": 12, "per_source": True, "max_sources": 4}
    with make_service(tmp_path, reservoir=settings) as service:
        send_frames(service.endpoints["frames"], "cam-a", 20, 1)
        send_frames(service.endpoints["frames"], "cam-b", 5, 2)
        assert wait_until(lambda: service.counters()["frames_accepted"] == 25)
        before, sources, seen = held(service.reservoir), service.reservoir.sources(), service.reservoir.seen
    assert len(before) == 11 and (tmp_path / SAVED_FILE).exists()

    with make_service(tmp_path, reservoir=settings) as again:
        assert held(again.reservoir) == before
        assert again.reservoir.sources() == sources and again.reservoir.seen == seen
        assert again.counters()["reservoir_bytes"] == sum(len(p) for p, *_ in before)
        # Sampling goes on where it stopped: cam-a keeps its 6 of 12 slots, the quiet cam-b its 5 frames.
        send_frames(again.endpoints["frames"], "cam-a", 30, 3)
        assert wait_until(lambda: again.counters()["frames_accepted"] == 30)
        assert len(again.reservoir) == 11 and again.reservoir.sources()["cam-b"] == 5


def test_a_damaged_saved_reservoir_is_logged_and_the_service_starts_empty(tmp_path, caplog):
    (tmp_path / SAVED_FILE).write_bytes(b"PK\x03\x04 cut short by a full disk")
    with caplog.at_level(logging.WARNING, logger="cl_agent.reservoir"):
        with make_service(tmp_path) as service:
            assert len(service.reservoir) == 0 and service.reservoir.nbytes == 0
    assert "ignoring the saved frame reservoir" in caplog.text


def test_a_saved_file_with_pickled_objects_is_refused_not_unpickled(tmp_path, caplog):
    buffer = io.BytesIO()
    np.savez(buffer, index=np.array([{"format": 1}], dtype=object), payloads=np.zeros(4, np.uint8))
    (tmp_path / SAVED_FILE).write_bytes(buffer.getvalue())
    reservoir = Reservoir(10)
    with caplog.at_level(logging.WARNING, logger="cl_agent.reservoir"):
        assert reservoir.restore(tmp_path / SAVED_FILE) == 0
    assert "ignoring" in caplog.text


def test_out_of_range_frame_offsets_are_refused(tmp_path):
    reservoir = Reservoir(10)
    for i in range(3):
        reservoir.add(frame(i))
    path = reservoir.save(tmp_path / SAVED_FILE)
    with np.load(path) as data:
        index, payloads = bytes(data["index"]), data["payloads"]
    np.savez(path, index=np.frombuffer(index, np.uint8), payloads=payloads[:5])  # the last frames' bytes are gone
    assert Reservoir(10).restore(path) == 0


def test_restore_with_a_new_capacity_offers_the_frames_again_within_the_new_bound(tmp_path):
    reservoir = Reservoir(50, seed=0)
    for i in range(200):
        reservoir.add(frame(i))
    path = reservoir.save(tmp_path / SAVED_FILE)
    smaller = Reservoir(20, seed=0)
    assert smaller.restore(path) == 20
    assert {bytes(f.payload) for f in smaller.sample(100)} <= {bytes(f.payload) for f in reservoir.sample(100)}
    assert Reservoir(50).restore(tmp_path / "missing.npz") == 0


def test_an_index_with_a_frame_that_is_not_one_is_refused(tmp_path):
    import json

    reservoir = Reservoir(10)
    reservoir.add(frame(1))
    path = reservoir.save(tmp_path / SAVED_FILE)
    with np.load(path) as data:
        index, payloads = json.loads(bytes(data["index"])), data["payloads"]
    index["pools"][0]["frames"][0][3] = [0, 4, 3]  # a frame with no rows
    np.savez(path, index=np.frombuffer(json.dumps(index).encode(), np.uint8), payloads=payloads)
    assert Reservoir(10).restore(path) == 0
