"""The unlabeled frames survive a clean stop and start: saved to the workdir, restored, damage ignored."""

import io
import json
import logging

import numpy as np

from cl_agent.client import FrameClient
from cl_agent.reservoir import SAVED_FILE, Frame, Reservoir
from ingest_support import images, make_service, wait_until


def frame(i, source="cam"):
    return Frame(i.to_bytes(4, "little"), "jpeg", (4, 4, 3), "rgb", source)


def held(reservoir):
    return sorted((bytes(f.payload), f.encoding, tuple(f.shape), f.color, f.source) for f in reservoir.sample(10**6))


def saved_parts(tmp_path, count, first=0):
    """Frames ``first`` .. ``first + count - 1`` saved by a Reservoir(10): the file, its index (parsed) and its payload bytes."""
    reservoir = Reservoir(10)
    for i in range(first, first + count):
        reservoir.add(frame(i))
    path = reservoir.save(tmp_path / SAVED_FILE)
    with np.load(path) as data:
        return path, json.loads(bytes(data["index"])), data["payloads"]


def write_saved(path, index: dict, payloads: np.ndarray) -> None:
    """Write a saved reservoir's two arrays as ``np.savez`` does (a hand-made or changed index)."""
    np.savez(path, index=np.frombuffer(json.dumps(index).encode(), np.uint8), payloads=payloads)


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
    path, index, payloads = saved_parts(tmp_path, 3)
    write_saved(path, index, payloads[:5])  # the last frames' bytes are gone
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
    path, index, payloads = saved_parts(tmp_path, 1, first=1)
    index["pools"][0]["frames"][0][3] = [0, 4, 3]  # a frame with no rows
    write_saved(path, index, payloads)
    assert Reservoir(10).restore(path) == 0


def pools_of(reservoir):
    return {key: (pool.capacity, pool.seen, [tuple(f) for f in pool.items]) for key, pool in reservoir._pools.items()}


def varied_reservoir(count=60):
    reservoir = Reservoir(24, per_source=True, seed=3, max_sources=3)
    for i in range(count):
        payload = bytes([i % 256]) * (i % 7) + i.to_bytes(4, "little")  # sizes differ; one source sends empty-ish frames
        reservoir.add(Frame(payload, ("jpeg", "png", "raw")[i % 3], (1 + i % 5, 2 + i % 3, 1 + 2 * (i % 2)),
                            ("rgb", "bgr", "gray")[i % 3], f"cam-{i % 5}"))
    return reservoir


def test_save_and_restore_round_trip_every_frame_and_the_sampling_bookkeeping_exactly(tmp_path):
    reservoir = varied_reservoir()
    path = reservoir.save(tmp_path / SAVED_FILE)
    with np.load(path, allow_pickle=False) as data:  # still a plain NumPy archive of two uint8 arrays
        assert sorted(data.files) == ["index", "payloads"] and data["payloads"].dtype == np.uint8
        assert len(data["payloads"]) == reservoir.nbytes
    again = Reservoir(24, per_source=True, seed=3, max_sources=3)
    assert again.restore(path) == len(reservoir)
    assert pools_of(again) == pools_of(reservoir)  # keys, capacities, counts, frames in order, every field
    assert (again.seen, again.nbytes, again.sources()) == (reservoir.seen, reservoir.nbytes, reservoir.sources())
    assert all(type(f.payload) is bytes and type(f.shape) is tuple for p in again._pools.values() for f in p.items)


def test_a_reservoir_saved_as_one_joined_array_by_np_savez_is_restored(tmp_path):
    """The layout of files written before the payloads were streamed: the same archive, read the same."""
    reservoir = varied_reservoir()
    pools, payloads = [], []
    for key, pool in reservoir._pools.items():
        frames = []
        for f in pool.items:
            frames.append([sum(map(len, payloads)), len(f.payload), f.encoding, list(f.shape), f.color, f.source])
            payloads.append(f.payload)
        pools.append({"key": key, "capacity": pool.capacity, "seen": pool.seen, "frames": frames})
    index = {"format": 1, "capacity": 24, "per_source": True, "max_sources": 3, "seen": reservoir.seen, "pools": pools}
    write_saved(tmp_path / SAVED_FILE, index, np.frombuffer(b"".join(payloads), np.uint8))
    again = Reservoir(24, per_source=True, seed=3, max_sources=3)
    assert again.restore(tmp_path / SAVED_FILE) == len(reservoir)
    assert pools_of(again) == pools_of(reservoir)


def test_a_truncated_or_corrupted_saved_reservoir_is_ignored_with_a_warning(tmp_path, caplog):
    path = varied_reservoir().save(tmp_path / SAVED_FILE)
    good = path.read_bytes()
    start = good.index(b"payloads.npy")  # the payload entry's local header; its data follows
    damaged = {
        "cut in the payloads": good[: start + 200],
        "cut before the directory": good[: len(good) - 30],
        "a payload byte flipped": good[: start + 300] + bytes([good[start + 300] ^ 0xFF]) + good[start + 301:],
        "empty": b"",
    }
    for what, data in damaged.items():
        path.write_bytes(data)
        reservoir = Reservoir(24, per_source=True, seed=3, max_sources=3)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="cl_agent.reservoir"):
            assert reservoir.restore(path) == 0, what
        assert (len(reservoir), reservoir.nbytes, reservoir.seen, reservoir.sources()) == (0, 0, 0, {}), what
        assert "ignoring the saved frame reservoir" in caplog.text and "starting with no unlabeled frames" in caplog.text, what
        reservoir.add(frame(1))  # and it goes on sampling
        assert len(reservoir) == 1


def test_the_ingest_service_starts_empty_after_a_saved_reservoir_was_cut_short(tmp_path, caplog):
    path = varied_reservoir().save(tmp_path / SAVED_FILE)
    path.write_bytes(path.read_bytes()[:-100])
    with caplog.at_level(logging.WARNING, logger="cl_agent.reservoir"):
        with make_service(tmp_path) as service:
            assert len(service.reservoir) == 0
            send_frames(service.endpoints["frames"], "cam", 3, 4)
            assert wait_until(lambda: service.counters()["frames_accepted"] == 3)
    assert "ignoring the saved frame reservoir" in caplog.text
    assert Reservoir(100).restore(path) == 3  # the clean stop saved the new frames over the damaged file


def test_saving_and_restoring_take_no_copy_of_the_payloads_beyond_the_frames_restored(tmp_path):
    import tracemalloc

    reservoir = Reservoir(400, per_source=True)
    for i in range(400):
        reservoir.add(Frame(bytes([i % 251]) * 20_000, "jpeg", (8, 8, 3), "rgb", f"cam-{i % 4}"))
    total = reservoir.nbytes  # 8 MB
    tracemalloc.start()
    try:
        reservoir.save(tmp_path / SAVED_FILE)
        _, saving = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        again = Reservoir(400, per_source=True)
        again.restore(tmp_path / SAVED_FILE)
        _, restoring = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert again.nbytes == total
    assert saving < 0.25 * total, f"saving {total} bytes of frames peaked at {saving} bytes more"
    assert restoring < 1.25 * total, f"restoring {total} bytes of frames peaked at {restoring} bytes (the frames included)"


def test_an_index_whose_frames_share_bytes_is_refused(tmp_path):
    """Each saved byte belongs to one frame: a hand-made index cannot make a start copy the same bytes many times."""
    path, index, payloads = saved_parts(tmp_path, 3)
    index["pools"][0]["frames"][2][0] = 0  # the third frame's bytes are the first one's
    write_saved(path, index, payloads)
    assert Reservoir(10).restore(path) == 0
