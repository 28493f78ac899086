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
