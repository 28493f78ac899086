"""Experiences: the cut policy, the durable store, decoding on demand; the label map."""

import cv2
import numpy as np
import pytest

from cl_agent.config import ExperienceSection
from cl_agent.experience import CUT_COUNT, CUT_TIME, ExperiencePolicy, ExperienceStore, Sample, decode_sample
from cl_agent.keyset import KeySet
from cl_agent.labels import LabelError, LabelMap
from cl_agent.reservoir import Frame
from cl_agent.spool import Record, Spool


def test_policy_count_time_and_minimum():
    policy = ExperiencePolicy(ExperienceSection(labeled_samples=100, max_wait_s=10, min_samples=5))
    assert policy.reason_to_cut(100, 0.0, now=1.0) == CUT_COUNT
    assert policy.reason_to_cut(50, 0.0, now=5.0) is None
    assert policy.reason_to_cut(50, 0.0, now=10.0) == CUT_TIME
    assert policy.reason_to_cut(4, 0.0, now=100.0) is None  # too few samples: keep waiting
    assert policy.reason_to_cut(0, None, now=100.0) is None


def _jpeg(h, w, value):
    image = np.full((h, w, 3), value, np.uint8)
    return cv2.imencode(".jpg", image)[1].tobytes()


def test_store_cut_load_decode_and_mark_trained(tmp_path):
    spool = Spool(tmp_path / "spool", 0, 10**9)
    payloads = [_jpeg(40, 60, 10 * i) for i in range(3)]
    spool.append(Record("s", 1, "jpeg", [(40, 60, 3)] * 3, [0, 1, 1], payloads))
    spool.commit()
    store = ExperienceStore(tmp_path)
    assert store.last_index == -1 and store.pending() == []
    frames = [Frame(_jpeg(480, 640, 200), "jpeg", (480, 640, 3), "rgb", "cam")]
    store.write(0, labeled_segment=spool.segment_path(0).name, labeled_samples=3, keys=spool.segment_keys,
                unlabeled=frames, reason="count", classes=[0, 1])
    spool.cut()
    assert store.last_index == 0 and store.pending() == [0]
    assert set(store.committed_keys()) == {("s", 1)}
    experience = store.load(0)
    labeled, labels, unlabeled = experience.decode(32)
    assert labeled.shape == (3, 32, 32, 3) and labeled.dtype == np.uint8
    assert labels.tolist() == [0, 1, 1] and labels.dtype == np.int64
    assert unlabeled.shape == (1, 32, 32, 3) and abs(int(unlabeled.mean()) - 200) < 5
    assert abs(int(labeled[2].mean()) - 20) < 5
    store.mark_trained(0)
    assert store.pending() == [] and store.is_trained(0)
    # A second store on the same folder (another process) sees the same state.
    assert ExperienceStore(tmp_path).pending() == [] and ExperienceStore(tmp_path).last_index == 0
    with pytest.raises(KeyError):
        store.load(1)


def _cut(store: ExperienceStore, spool: Spool, index: int) -> None:
    spool.append(Record("s", index, "jpeg", [(8, 8, 3)], [0], [_jpeg(8, 8, 0)]))
    spool.commit()
    store.write(index, labeled_segment=spool.segment_path(index).name, labeled_samples=1, keys=spool.segment_keys,
                unlabeled=[], reason="count", classes=[0])
    spool.cut()


def test_pending_follows_other_processes_and_a_poll_looks_only_at_untrained_and_new_experiences(tmp_path, monkeypatch):
    from pathlib import Path

    spool = Spool(tmp_path / "spool", 0, 10**9)
    ingest, trainer = ExperienceStore(tmp_path), ExperienceStore(tmp_path)  # as in two processes
    for index in range(200):
        _cut(ingest, spool, index)
        if index < 197:
            ingest.mark_trained(index)
    assert trainer.pending() == [197, 198, 199]
    _cut(ingest, spool, 200)  # cut by the other process
    ingest.mark_trained(197)
    assert trainer.pending() == [198, 199, 200]
    # A person moves an untrained experience's folder away: it is no longer pending.
    trainer.experience_dir(199).rename(tmp_path / "moved-away")
    assert trainer.pending() == [198, 200]
    # ... and back (or another untrained one put in below the newest): pending again.
    (tmp_path / "moved-away").rename(trainer.experience_dir(199))
    assert trainer.pending() == [198, 199, 200]
    trainer.experience_dir(199).rename(tmp_path / "moved-away")
    assert trainer.pending() == [198, 200]

    looked_at = []
    real_exists = Path.exists
    monkeypatch.setattr(Path, "exists", lambda self: looked_at.append(self) or real_exists(self))
    _cut(ingest, spool, 201)
    looked_at.clear()
    assert trainer.pending() == [198, 200, 201]
    # Above the newest seen until one is missing (202), and each untrained one: not the 198 trained ones.
    touched = {int(path.parent.name) for path in looked_at}
    assert touched == {198, 200, 201, 202}, sorted(touched)


def test_decode_raw_grey_and_bgr():
    grey = Sample(bytes([7]) * 64, "raw", (8, 8, 1))
    assert decode_sample(grey, 8).shape == (8, 8, 3)
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV order
    out = decode_sample(Sample(bgr.tobytes(), "raw", (8, 8, 3), "bgr"), 4)
    assert out.shape == (4, 4, 3) and out[..., 0].min() == 255 and out[..., 2].max() == 0


def test_label_map_names_ids_limit_and_persistence(tmp_path):
    path = tmp_path / "labels.json"
    labels = LabelMap(path, max_classes=4)
    assert labels.ids_for(["cat", "dog", "cat"]) == [0, 1, 0]
    assert labels.id_for(1) == 1 and labels.names == ["cat", "dog"]
    with pytest.raises(LabelError) as info:
        labels.ids_for(["bird", "fish", "cow"])  # 5 classes > 4: refused as a whole
    assert info.value.reason == "too_many_classes" and labels.names == ["cat", "dog"]
    with pytest.raises(LabelError) as info:
        labels.id_for(4)
    assert info.value.reason == "bad_class_id"
    assert labels.ids_for([3]) == [3] and labels.names == ["cat", "dog", "2", "3"]  # placeholders fill ids 2..3
    with pytest.raises(LabelError):
        labels.id_for("bird")  # the map is full
    reloaded = LabelMap(path, max_classes=4)
    assert reloaded.names == labels.names and reloaded.id_for("cat") == 0


def test_label_map_integer_ids_get_placeholder_names(tmp_path):
    labels = LabelMap(tmp_path / "labels.json", max_classes=10)
    assert labels.ids_for([3]) == [3]
    assert labels.names == ["0", "1", "2", "3"]
    assert labels.id_for("new") == 4 and labels.id_for("2") == 2


def test_decode_logs_one_warning_with_dropped_counts(tmp_path, caplog):
    good = _jpeg(40, 60, 100)
    # A JPEG whose header survives (it was acked at ingest) but whose body is cut off and overwritten.
    broken = good[:200] + b"\x00" * 10
    spool = Spool(tmp_path / "spool", 0, 10**9)
    spool.append(Record("s", 1, "jpeg", [(40, 60, 3)] * 3, [0, 1, 2], [good, b"not a jpeg", broken]))
    spool.commit()
    store = ExperienceStore(tmp_path)
    frames = [Frame(good, "jpeg", (40, 60, 3), "rgb", "cam"), Frame(b"\xff\xd8junk", "jpeg", (40, 60, 3), "rgb", "cam")]
    store.write(0, labeled_segment=spool.segment_path(0).name, labeled_samples=3, keys=spool.segment_keys,
                unlabeled=frames, reason="count")
    experience = store.load(0)
    with caplog.at_level("WARNING", logger="cl_agent.experience"):
        labeled, labels, unlabeled = experience.decode(16)
    assert len(labeled) == len(labels) and len(unlabeled) == 1
    dropped_labeled = 3 - len(labeled)
    assert dropped_labeled >= 1  # at least the non-JPEG bytes
    warnings = [r for r in caplog.records if r.name == "cl_agent.experience" and r.levelname == "WARNING"]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    assert "experience 0" in message and f"{dropped_labeled} labeled" in message and "1 unlabeled" in message
    assert warnings[0].dropped_labeled == dropped_labeled and warnings[0].dropped_unlabeled == 1


def test_decode_of_readable_experience_logs_nothing(tmp_path, caplog):
    spool = Spool(tmp_path / "spool", 0, 10**9)
    spool.append(Record("s", 1, "jpeg", [(40, 60, 3)], [0], [_jpeg(40, 60, 50)]))
    spool.commit()
    store = ExperienceStore(tmp_path)
    store.write(0, labeled_segment=spool.segment_path(0).name, labeled_samples=1, keys=spool.segment_keys,
                unlabeled=[], reason="count")
    with caplog.at_level("WARNING", logger="cl_agent.experience"):
        store.load(0).decode(16)
    assert not [r for r in caplog.records if r.name == "cl_agent.experience"]


def test_bench_store_reports_polls_against_a_full_scan(capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench_store.py"
    spec = importlib.util.spec_from_file_location("bench_store", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--experiences", "30", "--messages", "3", "--polls", "2"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["experiences"] == 30 and result["keys"] == 32 * 3 and result["key_runs"] == 1
    assert result["poll_ms"] > 0 and result["full_scan_ms"] > 0 and result["first_pending_ms"] > 0
    assert result["records_tail_ms"] > 0 and result["records_full_read_ms"] > 0
    assert result["committed_keys_summary_ms"] > 0 and result["start_ms"] > 0 and result["start_without_summary_ms"] > 0


def _store_with_keys(tmp_path, experiences: int) -> ExperienceStore:
    spool = Spool(tmp_path / "spool", 0, 10**9)
    store = ExperienceStore(tmp_path)
    for index in range(experiences):
        _cut(store, spool, index)
    return store


def test_keys_at_start_read_only_the_experiences_after_the_summary(tmp_path, monkeypatch):
    store = _store_with_keys(tmp_path, 6)
    everything = {("s", i) for i in range(6)}
    store.save_keys(3, KeySet([("s", i) for i in range(4)]))
    read = []
    original = ExperienceStore.meta
    monkeypatch.setattr(ExperienceStore, "meta", lambda self, index: read.append(index) or original(self, index))
    assert set(ExperienceStore(tmp_path).committed_keys()) == everything
    assert read == [4, 5]


@pytest.mark.parametrize("summary, reason", [
    ('{"through": 3, "runs": {"s": [[0, 3]]', "JSONDecodeError"),  # torn by hand: the writes are atomic
    ('{"through": 9, "runs": {"s": [[0, 9]]}}', "experience 9, the last it covers, is not in the store"),
    ('{"through": "3", "runs": {}}', "through must be an integer"),
    ('{"through": 3, "runs": {"s": [[3, 0]]}}', "is not a run"),
    ('[3]', "TypeError"),
])
def test_an_unusable_key_summary_is_named_and_every_experience_is_read(tmp_path, caplog, summary, reason):
    _store_with_keys(tmp_path, 6)
    (tmp_path / "experiences" / "keys.json").write_text(summary)
    with caplog.at_level("WARNING", logger="cl_agent.experience"):
        keys = ExperienceStore(tmp_path).committed_keys()
    assert set(keys) == {("s", i) for i in range(6)}
    assert "keys.json" in caplog.text and reason in caplog.text


def test_the_summary_is_not_an_experience(tmp_path):
    store = _store_with_keys(tmp_path, 2)
    store.save_keys(1, store.committed_keys())
    again = ExperienceStore(tmp_path)
    assert again.indices() == [0, 1] and again.pending() == [0, 1] and again.last_index == 1


def test_a_summary_half_written_by_a_killed_process_is_discarded(tmp_path):
    store = _store_with_keys(tmp_path, 2)
    store.save_keys(1, store.committed_keys())
    leftover = tmp_path / "experiences" / ".keys.json.x1y2z3.tmp"
    leftover.write_text('{"through": 1, "ru')
    assert store.discard_unfinished_writes() == 1 and not leftover.exists()
    assert (tmp_path / "experiences" / "keys.json").exists() and store.indices() == [0, 1]


def test_a_first_sample_time_in_the_future_restarts_the_wait_once_instead_of_holding_the_cut_off():
    # The clock stepped back 1000 s after the first sample was stamped: its time is ahead of now.
    policy = ExperiencePolicy(ExperienceSection(labeled_samples=100, max_wait_s=10, min_samples=5))
    first = 5000.0
    assert policy.reason_to_cut(50, first, now=4000.0) is None  # taken as now: the wait starts over
    assert policy.reason_to_cut(50, first, now=4009.0) is None
    assert policy.reason_to_cut(50, first, now=4010.0) == CUT_TIME  # max_wait_s after that, not 1000 s later
    # a new open experience whose first sample is in the past is timed from that sample as before
    assert policy.reason_to_cut(50, 4005.0, now=4010.0) is None
    assert policy.reason_to_cut(50, 4005.0, now=4015.0) == CUT_TIME


def test_experience_folders_past_999999_are_listed_in_numeric_order_and_other_names_passed_by(tmp_path):
    store = ExperienceStore(tmp_path)
    for index in (999_999, 1_000_000, 12):
        store.write(index, labeled_segment=f"labeled-{index:06d}.log", labeled_samples=0, keys=[], unlabeled=[], reason=CUT_COUNT)
    for name in ("²", "notes", "0000a1"):  # not experience folders ("²" passes str.isdigit, int() refuses it)
        (store.root / name).mkdir()
        (store.root / name / "meta.json").write_text("{}")
    assert store.indices() == [12, 999_999, 1_000_000]
    assert store.pending() == [12, 999_999, 1_000_000]
