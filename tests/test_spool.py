"""The labeled spool: durable records, torn tails cut on reopen, idempotency keys, size limit, rollback."""

import errno

import pytest

from cl_agent.spool import Record, Spool, SpoolFull, read_records


def record(seq, n=2, sender="s"):
    return Record(sender, seq, "jpeg", [(4, 4, 3)] * n, [seq % 3] * n, [bytes([seq % 256]) * (10 + i) for i in range(n)])


def test_commit_and_reopen(tmp_path):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    for seq in range(5):
        spool.append(record(seq))
    assert spool.contains("s", 3)
    assert spool.commit() == 5
    spool.close()
    reopened = Spool(tmp_path, 0, max_bytes=10**9)
    assert reopened.records == 5 and reopened.samples == 10
    assert reopened.contains("s", 4) and not reopened.contains("s", 5)
    stored = [r for _, r in read_records(reopened.segment_path(0))]
    assert [r.seq for r in stored] == list(range(5))
    assert stored[2].payloads == record(2).payloads and stored[2].labels == [2, 2]


def test_torn_tail_is_cut(tmp_path):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    spool.append(record(0))
    spool.append(record(1))
    spool.commit()
    spool.close()
    path = spool.segment_path(0)
    good_size = path.stat().st_size
    data = record(2).to_bytes()
    with open(path, "ab") as f:
        f.write(data[: len(data) // 2])  # a crash in the middle of a write
    reopened = Spool(tmp_path, 0, max_bytes=10**9)
    assert reopened.records == 2 and path.stat().st_size == good_size
    reopened.append(record(2))
    reopened.commit()
    assert [r.seq for _, r in read_records(path)] == [0, 1, 2]


def test_corrupt_record_stops_reading(tmp_path):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    for seq in range(3):
        spool.append(record(seq))
    spool.commit()
    spool.close()
    path = spool.segment_path(0)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip a payload byte of the last record: its checksum fails
    path.write_bytes(bytes(data))
    assert [r.seq for _, r in read_records(path)] == [0, 1]


def test_size_limit_refuses_without_writing(tmp_path):
    one = len(record(0).to_bytes())
    spool = Spool(tmp_path, 0, max_bytes=2 * one + 5)
    spool.append(record(0))
    spool.append(record(1))
    with pytest.raises(SpoolFull):
        spool.append(record(2))
    assert spool.commit() == 2
    assert not spool.contains("s", 2)


def test_rollback_after_failed_commit(tmp_path, monkeypatch):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    spool.append(record(0))
    spool.commit()
    spool.append(record(1))

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("os.fdatasync", no_space)
    with pytest.raises(OSError):
        spool.commit()
    monkeypatch.undo()
    assert not spool.contains("s", 1) and spool.records == 1
    assert [r.seq for _, r in read_records(spool.segment_path(0))] == [0]
    spool.append(record(1))
    assert spool.commit() == 1


def test_cut_opens_the_next_segment_and_keeps_keys(tmp_path):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    spool.append(record(0))
    spool.commit()
    index, keys, size = spool.cut()
    assert (index, keys) == (0, [("s", 0)]) and size > 0
    assert spool.segment == 1 and spool.samples == 0 and spool.contains("s", 0)
    assert spool.size_bytes == size


def test_one_writer_per_spool(tmp_path):
    from cl_agent.errors import CLAgentError

    spool = Spool(tmp_path, 0, max_bytes=10**9)
    with pytest.raises(CLAgentError, match="in use"):
        Spool(tmp_path, 0, max_bytes=10**9)
    spool.close()
    Spool(tmp_path, 0, max_bytes=10**9).close()


class _FailingWrites:
    """The segment file, with its ``fail_at``-th write (1-based) failing: ENOSPC, or a short write of half the bytes."""

    def __init__(self, file, fail_at: int, short: bool = False, truncate_fails: bool = False):
        self.file, self.fail_at, self.short, self.truncate_fails, self.writes = file, fail_at, short, truncate_fails, 0

    def write(self, data):
        self.writes += 1
        if self.writes == self.fail_at:
            if self.short:
                return self.file.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.file.write(data)

    def truncate(self, size):
        if self.truncate_fails:
            self.truncate_fails = False
            raise OSError(errno.EIO, "Input/output error")
        return self.file.truncate(size)

    def __getattr__(self, name):
        return getattr(self.file, name)


@pytest.mark.parametrize("short", [False, True], ids=["enospc", "short_write"])
def test_a_failed_write_removes_only_its_own_record(tmp_path, short):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    spool.append(record(9))
    spool.commit()
    spool._file = _FailingWrites(spool._file, fail_at=2, short=short)
    spool.append(record(0))
    with pytest.raises(OSError):
        spool.append(record(1))
    assert spool.contains("s", 0) and not spool.contains("s", 1)
    spool.append(record(2))
    assert spool.commit() == 2
    assert (spool.records, spool.samples) == (3, 6)
    assert [r.seq for _, r in read_records(spool.segment_path(0))] == [9, 0, 2]
    assert spool.segment_path(0).stat().st_size == spool.offset
    spool.close()
    assert Spool(tmp_path, 0, max_bytes=10**9).records == 3


def test_when_a_failed_write_cannot_be_cut_back_the_whole_group_is_refused(tmp_path):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    spool.append(record(9))
    spool.commit()
    spool._file = _FailingWrites(spool._file, fail_at=2, short=True, truncate_fails=True)
    spool.append(record(0))
    with pytest.raises(OSError):
        spool.append(record(1))
    spool.append(record(2))
    with pytest.raises(OSError, match="short write"):
        spool.commit()  # record 0's bytes went with the failed cut: none of the group may be acked
    assert not spool.contains("s", 0) and not spool.contains("s", 2) and spool.records == 1
    assert [r.seq for _, r in read_records(spool.segment_path(0))] == [9]
    assert spool.commit() == 0


def test_drop_last_removes_the_last_pending_record(tmp_path):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    spool.append(record(0))
    spool.append(record(1, n=3))
    spool.drop_last()
    assert not spool.contains("s", 1) and (spool.records, spool.samples) == (1, 2)
    assert spool.commit() == 1
    assert [r.seq for _, r in read_records(spool.segment_path(0))] == [0]


@pytest.mark.parametrize("where", ["payload", "length_field"])
def test_intact_records_after_a_damaged_one_are_kept_and_the_damage_set_aside(tmp_path, caplog, where):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    for seq in range(4):
        spool.append(record(seq))
        spool.commit()
    spool.close()
    path = spool.segment_path(0)
    data = bytearray(path.read_bytes())
    ends = [end for end, _ in read_records(path)]
    bad = ends[1] - 1 if where == "payload" else ends[0] + 5  # record 1's last byte, or its meta length field
    data[bad] ^= 0xFF
    path.write_bytes(bytes(data))
    reopened = Spool(tmp_path, 0, max_bytes=10**9)
    assert [r.seq for _, r in read_records(path)] == [0, 2, 3]
    assert reopened.records == 3 and reopened.contains("s", 3) and not reopened.contains("s", 1)
    aside = tmp_path / f"{path.name}.corrupt-1"
    assert aside.read_bytes() == bytes(data[ends[0]:])  # every byte from the damage on, record 1's included
    assert "2 intact records after it" in caplog.text and str(aside) in caplog.text
    reopened.append(record(4))
    reopened.commit()
    reopened.close()
    assert [r.seq for _, r in read_records(path)] == [0, 2, 3, 4]
    Spool(tmp_path, 0, max_bytes=10**9).close()
    assert sorted(p.name for p in tmp_path.glob("*.corrupt-*")) == [aside.name]  # repaired once


def test_a_torn_tail_sets_nothing_aside(tmp_path):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    spool.append(record(0))
    spool.commit()
    spool.close()
    path = spool.segment_path(0)
    with open(path, "ab") as f:
        f.write(record(1).to_bytes()[:-4])
    Spool(tmp_path, 0, max_bytes=10**9).close()
    assert [r.seq for _, r in read_records(path)] == [0] and not list(tmp_path.glob("*.corrupt-*"))


def test_a_record_inside_a_damaged_body_is_not_taken_for_a_stored_one(tmp_path):
    spool = Spool(tmp_path, 0, max_bytes=10**9)
    spool.append(record(0))
    inner = Record("intruder", 77, "raw", [(1, 1, 3)], [0], [b"abc"]).to_bytes()  # sent as image bytes
    spool.append(Record("s", 1, "raw", [(1, 1, len(inner) + 1)], [0], [inner + b"x"]))
    spool.append(record(2))
    spool.commit()
    spool.close()
    path = spool.segment_path(0)
    data = bytearray(path.read_bytes())
    data[[end for end, _ in read_records(path)][1] - 1] ^= 0xFF  # the last byte of record 1, after the embedded one
    path.write_bytes(bytes(data))
    Spool(tmp_path, 0, max_bytes=10**9).close()
    assert [(r.sender, r.seq) for _, r in read_records(path)] == [("s", 0), ("s", 2)]
