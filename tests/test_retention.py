"""Trained experiences' data is kept up to spool.keep_trained_bytes; the oldest goes first, nothing untrained is touched."""

import pytest

from cl_agent import ingest
from cl_agent.client import LabeledClient
from cl_agent.errors import CLAgentError
from cl_agent.experience import PRUNED_MARKER, UNLABELED_FILE, ExperienceStore
from cl_agent.reservoir import Frame
from cl_agent.retention import KEEP_ALL, TrainedRetention
from cl_agent.spool import Record
from ingest_support import images, make_service, wait_until


def _cut(store: ExperienceStore, index: int, labeled_bytes: int = 1000, frames: int = 2) -> None:
    """A cut experience: a labeled segment of one record and ``frames`` drawn frames of 500 bytes."""
    store.spool_dir.mkdir(parents=True, exist_ok=True)
    segment = store.spool_dir / f"labeled-{index:06d}.log"
    segment.write_bytes(Record("s", index, "png", [(8, 8, 3)], [0], [b"x" * labeled_bytes]).to_bytes())
    drawn = [Frame(b"f" * 500, "jpeg", (8, 8, 3), source="cam") for _ in range(frames)]
    store.write(index, labeled_segment=segment.name, labeled_samples=1, keys=[("s", index)], unlabeled=drawn, reason="count")


def _data_bytes(store: ExperienceStore, index: int) -> int:
    files = (store.spool_dir / f"labeled-{index:06d}.log", store.experience_dir(index) / UNLABELED_FILE)
    return sum(f.stat().st_size for f in files if f.exists())


def _has_data(store: ExperienceStore, index: int) -> bool:
    return (store.spool_dir / f"labeled-{index:06d}.log").exists() or (store.experience_dir(index) / UNLABELED_FILE).exists()


def test_the_oldest_trained_experiences_go_first_and_untrained_ones_are_never_touched(tmp_path):
    store = ExperienceStore(tmp_path)
    for index in range(6):
        _cut(store, index)
    for index in (0, 1, 2, 3):
        store.mark_trained(index)
    one = _data_bytes(store, 0)
    retention = TrainedRetention(store, max_bytes=2 * one)  # room for two trained experiences

    assert [i for i in range(6) if _has_data(store, i)] == [2, 3, 4, 5]
    assert retention.total == 2 * one and retention.pruned == 2
    assert store.is_pruned(0) and store.is_pruned(1) and not store.is_pruned(2)
    assert store.pending() == [4, 5]  # the meta and the trained marker stay: nothing is retrained or recut
    assert store.meta(0)["keys"] == [["s", 0]]

    store.mark_trained(4)
    assert retention.add([4]) == [2]  # the oldest trained goes, not the newly trained one
    assert [i for i in range(6) if _has_data(store, i)] == [3, 4, 5]
    assert _data_bytes(store, 5) == one  # untrained: its data stays whatever the limit
    with pytest.raises(CLAgentError, match=r"experience 2 was trained and its data deleted.*spool.keep_trained_bytes"):
        store.load(2)
    assert len(store.load(5).unlabeled) == 2


def test_keep_all_deletes_nothing_and_zero_keeps_no_trained_data(tmp_path):
    store = ExperienceStore(tmp_path)
    for index in range(3):
        _cut(store, index)
        store.mark_trained(index)
    kept = TrainedRetention(store, KEEP_ALL)
    assert kept.pruned == 0 and kept.total == sum(_data_bytes(store, i) for i in range(3))
    assert all(_has_data(store, i) for i in range(3))

    none = TrainedRetention(store, 0)
    assert none.pruned == 3 and none.total == 0
    assert not any(_has_data(store, i) for i in range(3))
    with pytest.raises(ValueError, match="max_bytes"):
        TrainedRetention(store, -2)


def test_a_crash_between_the_marker_and_the_removal_is_finished_on_the_next_start(tmp_path):
    store = ExperienceStore(tmp_path)
    for index in (0, 1):
        _cut(store, index)
        store.mark_trained(index)
        (store.experience_dir(index) / PRUNED_MARKER).write_text("1\n")  # the marker went down, the files did not
    (store.spool_dir / "labeled-000001.log").unlink()  # ... or only the first of the two went
    retention = TrainedRetention(store, KEEP_ALL)  # even when nothing more needs deleting
    assert not _has_data(store, 0) and not _has_data(store, 1) and retention.total == 0


def test_the_ingest_process_prunes_as_experiences_are_trained_and_still_knows_every_retried_message(tmp_path, monkeypatch):
    """Through real sockets: the data goes once trained; a message retried after a restart is still acked, not stored again."""
    monkeypatch.setattr(ingest, "SPOOL_RECOUNT_S", 0.05)
    store = ExperienceStore(tmp_path)
    with make_service(tmp_path, spool={"keep_trained_bytes": 0}) as service:
        client = LabeledClient(service.endpoints["labeled"], "robot-1", start_seq=1000)
        for step in range(3):
            assert client.send(images(2, seed=step), ["a", "b"], encoding="png").ok
            assert service.end_experience() == step
        client.close()
        assert all(_has_data(store, i) for i in range(3))  # not trained yet: kept whatever the limit
        store.mark_trained(0)
        store.mark_trained(1)
        assert wait_until(lambda: service.counters()["experiences_pruned"] == 2, timeout_s=5.0)
        assert [i for i in range(3) if _has_data(store, i)] == [2]
        assert service.counters()["trained_data_bytes"] == 0

    with make_service(tmp_path, spool={"keep_trained_bytes": 0}) as service:
        retry = LabeledClient(service.endpoints["labeled"], "robot-1", start_seq=1000)  # the first message again,
        # as a sender that lost its ack would resend it
        ack = retry.send(images(2, seed=0), ["a", "b"], encoding="png")
        retry.close()
        assert ack.ok and ack.accepted == 0  # recognised from experience 0's meta.json, whose data is gone
        assert service.counters()["labeled_duplicates"] == 1
