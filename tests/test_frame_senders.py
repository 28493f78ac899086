"""Two camera streams sharing one sender id are detected (warning + counter); one camera restarting is not."""

import logging

from cl_agent.client import FrameClient
from cl_agent.senders import CLASH_WINDOW_S, WARN_EVERY_S, FrameSenders
from ingest_support import make_service, send_accepted_frame, send_two_streams_under_one_id


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_gaps_are_drops_and_a_single_restart_is_not_a_clash(caplog):
    senders = FrameSenders(clock=Clock())
    with caplog.at_level(logging.WARNING, logger="cl_agent.senders"):
        results = [senders.observe("cam", seq) for seq in (0, 1, 5, 6, 0, 1, 2)]  # 3 lost, then a restart
    assert results == [(0, False), (0, False), (3, False), (0, False), (0, False), (0, False), (0, False)]
    assert caplog.text == ""


def test_interleaved_streams_warn_once_a_minute_and_their_gaps_are_not_drops(caplog):
    clock = Clock()
    senders = FrameSenders(clock=clock)
    stream_a, stream_b = iter(range(500, 10_000)), iter(range(10_000))

    def interleave(n):
        out = []
        for _ in range(n):
            out.append(senders.observe("cam-1", next(stream_a)))
            out.append(senders.observe("cam-1", next(stream_b)))
            clock.now += 0.05
        return out

    with caplog.at_level(logging.WARNING, logger="cl_agent.senders"):
        first = interleave(100)
    assert sum(clash for _, clash in first) == 1
    dropped = sum(n for n, _ in first)
    assert 0 < dropped <= 3 * 500  # only the jumps before the detection count
    assert caplog.text.count("two streams probably share this sender id") == 1 and "'cam-1'" in caplog.text
    assert sum(n for n, _ in interleave(100)) == 0  # still clashing: no drops, no second warning within the minute
    clock.now += WARN_EVERY_S
    assert sum(clash for _, clash in interleave(3)) == 1  # a minute on: warned (and counted) again
    # one stream stops: after a quiet window its gaps are counted again
    clock.now += CLASH_WINDOW_S + 1
    last = next(stream_a)
    senders.observe("cam-1", last)  # (its jump from the other stream's last seq is counted once)
    assert senders.observe("cam-1", last + 5) == (4, False)


def test_the_tracked_senders_are_bounded():
    senders = FrameSenders(max_senders=3, clock=Clock())
    for i in range(10):
        senders.observe(f"cam-{i}", 0)
    assert len(senders._senders) <= 3


def test_two_frame_clients_with_one_sender_id_warn_and_count(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cl_agent.senders"), make_service(tmp_path) as service:
        endpoint = service.endpoints["frames"]
        with FrameClient(endpoint, "cam-1") as first, FrameClient(endpoint, "cam-1") as second:
            send_two_streams_under_one_id(service, first, second)  # the first 10 frames ahead, then alternating
        counters = service.counters()
    assert counters["frames_sender_clashes"] == 1
    assert "frame sender 'cam-1'" in caplog.text and "two streams probably share this sender id" in caplog.text
    assert counters["frames_dropped"] < 3 * 10  # without the detection: about 8 x 10


def test_one_frame_client_restarting_does_not_warn(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="cl_agent.senders"), make_service(tmp_path) as service:
        endpoint = service.endpoints["frames"]
        accepted = 0
        for _ in range(2):  # the same camera, stopped and started again: its seqs start over at 0
            with FrameClient(endpoint, "cam-1") as client:
                for _ in range(5):
                    accepted += 1
                    send_accepted_frame(service, client, accepted)
        counters = service.counters()
    assert counters["frames_sender_clashes"] == 0 and counters["frames_dropped"] == 0
    assert "share this sender id" not in caplog.text
