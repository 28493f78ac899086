"""A write that fails inside a group: only that message is refused; what was acked is stored, and a refused
message adds no class name to labels.json."""

import errno
import json

import pytest

from cl_agent.client import LabeledClient
from cl_agent.config import WireSection
from cl_agent.ingest import COUNTER_NAMES
from cl_agent.intake import Counters, LabeledIntake
from cl_agent.labels import LabelMap
from cl_agent.spool import Spool, read_records
from cl_agent.wire import encode_message
from ingest_support import images, make_service


class FailingWrites:
    """A spool segment file whose writes numbered in ``failing`` (1-based) fail with ENOSPC."""

    def __init__(self, file, failing):
        self.file, self.failing, self.writes = file, failing, 0

    def write(self, data):
        self.writes += 1
        if self.writes in self.failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def _intake(tmp_path, max_bytes=10**9):
    spool = Spool(tmp_path / "spool", 0, max_bytes)
    labels = LabelMap(tmp_path / "labels.json", 10)
    return LabeledIntake(spool, labels, WireSection(), Counters(COUNTER_NAMES), lambda: 0), spool, labels


def _answers(replies):
    return [(a["kind"], a["seq"], a.get("reason"), a.get("duplicate")) for a in (json.loads(r[0]) for r in replies)]


def _stored(spool):
    return [r.seq for _, r in read_records(spool.segment_path(spool.segment))]


def _saved_names(tmp_path):
    path = tmp_path / "labels.json"
    return json.loads(path.read_text())["names"] if path.exists() else []


def test_a_failed_write_mid_group_refuses_only_that_message(tmp_path):
    intake, spool, _ = _intake(tmp_path)
    spool._file = FailingWrites(spool._file, {2})
    bodies = [encode_message("labeled", "s", seq, images(1, seed=seq), encoding="png", labels=["a"]) for seq in range(3)]
    bodies.append(bodies[0])  # a retry of seq 0 in the same group: a duplicate of a stored message
    assert _answers(intake.process(bodies)) == [
        ("ack", 0, None, False), ("nack", 1, "disk_full", None), ("ack", 2, None, False), ("ack", 0, None, True),
    ]
    assert _stored(spool) == [0, 2]
    assert spool.contains("s", 0) and not spool.contains("s", 1)
    assert _answers(intake.process([bodies[1]])) == [("ack", 1, None, False)]  # the retry is stored
    assert _stored(spool) == [0, 2, 1]


def test_a_failed_labels_json_write_is_a_nack_and_changes_nothing(tmp_path, monkeypatch):
    intake, spool, labels = _intake(tmp_path)
    first = encode_message("labeled", "s", 0, images(1), encoding="png", labels=["a"])
    assert _answers(intake.process([first])) == [("ack", 0, None, False)]

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cl_agent.labels.atomic_write_text", no_space)
    bodies = [encode_message("labeled", "s", seq, images(1), encoding="png", labels=[label]) for seq, label in ((1, "a"), (2, "b"), (3, "a"))]
    assert _answers(intake.process(bodies)) == [("ack", 1, None, False), ("nack", 2, "disk_full", None), ("ack", 3, None, False)]
    assert labels.names == ["a"] == _saved_names(tmp_path)  # memory and file agree
    assert _stored(spool) == [0, 1, 3] and not spool.contains("s", 2)
    monkeypatch.undo()
    assert _answers(intake.process([bodies[1]])) == [("ack", 2, None, False)]
    assert labels.names == ["a", "b"] == _saved_names(tmp_path)
    assert [r.labels for _, r in read_records(spool.segment_path(0))][-1] == [1]


@pytest.mark.parametrize("refusal", ["spool_full", "message_too_large", "disk_full"])
def test_a_refused_message_adds_no_class(tmp_path, refusal):
    first = encode_message("labeled", "s", 0, images(1), encoding="png", labels=["a"])
    record_bytes = 2 * len(b"".join(first))  # comfortably more than one record takes
    intake, spool, labels = _intake(tmp_path, {"spool_full": record_bytes, "message_too_large": 200}.get(refusal, 10**9))
    if refusal != "message_too_large":
        assert _answers(intake.process([first])) == [("ack", 0, None, False)]
    if refusal == "disk_full":
        spool._file = FailingWrites(spool._file, {1})
    names = labels.names
    big = encode_message("labeled", "s", 1, images(1, seed=1), encoding="png", labels=["brand-new"])
    assert _answers(intake.process([big])) == [("nack", 1, refusal, None)]
    assert labels.names == names == _saved_names(tmp_path)


def test_a_group_whose_commit_fails_keeps_the_names_it_saved(tmp_path, monkeypatch):
    """Documented: the names were saved before the commit (a trainer may have published them since)."""
    intake, spool, labels = _intake(tmp_path)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fdatasync", no_space)
    body = encode_message("labeled", "s", 0, images(1), encoding="png", labels=["a"])
    assert _answers(intake.process([body])) == [("nack", 0, "disk_full", None)]
    monkeypatch.undo()
    assert labels.names == ["a"] == _saved_names(tmp_path) and _stored(spool) == []
    assert _answers(intake.process([body])) == [("ack", 0, None, False)]
    assert labels.names == ["a"]


def test_every_acked_message_is_stored_when_writes_fail_inside_a_window(tmp_path):
    with make_service(tmp_path, spool={"group_commit_ms": 200}) as service:
        service.spool._file = FailingWrites(service.spool._file, set(range(3, 100, 3)))
        client = LabeledClient(service.endpoints["labeled"], "robot", timeout_s=5, retries=1, window=8)
        for i in range(16):
            client.submit(images(1, seed=i), ["a"], encoding="png")
        answers = client.flush()
        client.close()
        stored = [r.seq for _, r in read_records(service.spool.segment_path(service.spool.segment))]
    acked = [a.seq for a in answers if a.ok]
    assert len(answers) == 16 and {a.reason for a in answers if not a.ok} == {"disk_full"}
    assert acked and stored == acked
