"""The labeled spool's limit: never a deadlock when the open experience fills it, and a size gauge that falls."""

import time

from cl_agent.client import LabeledClient
from cl_agent.experience import ExperienceStore
from cl_agent.spool import Record, Spool
from ingest_support import images, make_service, wait_until


def test_an_open_experience_that_fills_the_spool_is_cut_so_training_can_free_it(tmp_path):
    # min_samples and max_wait_s would never cut these few samples: without a cut on a full
    # spool, every sender would be refused for ever.
    experience = {"min_samples": 1000, "max_wait_s": 3600.0}
    with make_service(tmp_path, spool={"max_bytes": 6000}, experience=experience) as service:
        client = LabeledClient(service.endpoints["labeled"], "s", window=1)
        acks = [client.send(images(1, seed=i), ["a"], encoding="png") for i in range(8)]
        assert [a.reason for a in acks if not a.ok][:1] == ["spool_full"]
        store = ExperienceStore(tmp_path)
        assert wait_until(lambda: store.indices() == [0])
        assert store.meta(0)["cut_reason"] == "spool_full"
        assert store.meta(0)["labeled_samples"] == sum(a.accepted for a in acks if a.ok)
        store.mark_trained(0)  # the trainer's part: a trained experience frees its bytes
        assert client.send(images(1, seed=99), ["a"], encoding="png").ok
        client.close()


def test_spool_bytes_falls_once_a_cut_experience_is_trained(tmp_path):
    with make_service(tmp_path) as service:
        client = LabeledClient(service.endpoints["labeled"], "s")
        assert client.send(images(4), ["a"] * 4, encoding="png").ok
        client.close()
        assert service.end_experience() == 0
        held = service.counters()["spool_bytes"]
        assert held > 0
        ExperienceStore(tmp_path).mark_trained(0)
        # the gauge (and status, and /metrics) shows what counts against spool.max_bytes
        assert wait_until(lambda: service.counters()["spool_bytes"] == 0, timeout_s=5.0)


def test_a_reopened_segment_keeps_the_arrival_time_of_its_first_sample(tmp_path):
    arrived = time.time() - 500.0
    spool = Spool(tmp_path, 0, 10**6)
    spool.append(Record("s", 1, "png", [(8, 8, 3)], [0], [b"x"], ts=arrived))
    spool.commit()
    spool.close()
    reopened = Spool(tmp_path, 0, 10**6)  # after a restart: the time cut counts from the first arrival
    assert abs(reopened.first_ts - arrived) < 1e-3
    reopened.close()


def test_a_message_larger_than_the_whole_spool_is_refused_as_too_large_not_as_full(tmp_path):
    # spool_full tells a sender to retry later (tools/send_labeled.py does, for ever); this one never fits.
    with make_service(tmp_path, spool={"max_bytes": 2000}) as service:
        client = LabeledClient(service.endpoints["labeled"], "s")
        ack = client.send(images(4, size=32), ["a"] * 4, encoding="png")
        assert not ack.ok and ack.reason == "message_too_large" and "spool.max_bytes" in ack.detail
        assert client.send(images(1, size=8), ["a"], encoding="png").ok  # a small one still fits
        client.close()
