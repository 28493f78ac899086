"""LabeledIntake without sockets: one commit per group, and no ack unless that commit returned."""

import errno
import json

from cl_agent.config import WireSection
from cl_agent.intake import Counters, EndRequest, LabeledIntake
from cl_agent.ingest import COUNTER_NAMES
from cl_agent.labels import LabelMap
from cl_agent.spool import Spool, read_records
from cl_agent.wire import encode_message
from ingest_support import images


def _intake(tmp_path):
    spool = Spool(tmp_path / "spool", 0, 10**9)
    counters = Counters(COUNTER_NAMES)
    return LabeledIntake(spool, LabelMap(tmp_path / "labels.json", 10), WireSection(), counters, lambda: 0), spool, counters


def _answers(parts_list):
    return [a if isinstance(a, EndRequest) else json.loads(a[0]) for a in parts_list]


def test_a_group_shares_one_commit_and_keeps_order(tmp_path):
    intake, spool, counters = _intake(tmp_path)
    bodies = [encode_message("labeled", "s", seq, images(2), labels=["a", "b"]) for seq in range(5)]
    bodies.insert(2, encode_message("end_experience", "s", 99))
    bodies.append(bodies[0])  # a retry inside the same group
    answers = _answers(intake.process(bodies))
    assert [a["seq"] for a in answers if not isinstance(a, EndRequest)] == [0, 1, 2, 3, 4, 0]
    assert isinstance(answers[2], EndRequest) and answers[2].seq == 99
    assert [a["duplicate"] for a in answers if not isinstance(a, EndRequest)] == [False] * 5 + [True]
    snapshot = counters.snapshot()
    assert snapshot["commits"] == 1 and snapshot["labeled_images_acked"] == 10
    assert [r.seq for _, r in read_records(spool.segment_path(0))] == [0, 1, 2, 3, 4]


def test_failed_commit_turns_every_ack_into_a_nack(tmp_path, monkeypatch):
    intake, spool, counters = _intake(tmp_path)
    intake.process([encode_message("labeled", "s", 0, images(1), labels=["a"])])

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fdatasync", no_space)
    bodies = [encode_message("labeled", "s", seq, images(1), labels=["a"]) for seq in (1, 2, 1)]
    answers = _answers(intake.process(bodies))
    assert [(a["kind"], a.get("reason")) for a in answers] == [("nack", "disk_full")] * 3
    monkeypatch.undo()
    assert [r.seq for _, r in read_records(spool.segment_path(0))] == [0]
    retry = _answers(intake.process(bodies[:2]))
    assert [(a["kind"], a["duplicate"]) for a in retry] == [("ack", False), ("ack", False)]
    assert counters.snapshot()["rejected"] == {"disk_full": 3}
