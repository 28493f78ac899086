"""The frame reservoir: never above capacity, uniform over the stream, per-source split."""

import random

from cl_agent.reservoir import OVERFLOW_SOURCE, Frame, Reservoir


def frame(i, source="cam"):
    return Frame(i.to_bytes(4, "little"), "jpeg", (4, 4, 3), "rgb", source)


def test_never_exceeds_capacity_and_counts_bytes():
    reservoir = Reservoir(50, seed=1)
    for i in range(5000):
        reservoir.add(frame(i))
        assert len(reservoir) <= 50
    assert len(reservoir) == 50 and reservoir.seen == 5000
    assert reservoir.nbytes == 50 * 4
    sample = reservoir.sample(20)
    assert len(sample) == 20 and len(set(sample)) == 20
    assert len(reservoir.sample(500)) == 50


def test_sample_is_uniform_over_the_stream():
    # Each of 1000 frames should survive with probability 100/1000: the mean kept index is near 500.
    means = []
    for seed in range(20):
        reservoir = Reservoir(100, seed=seed)
        for i in range(1000):
            reservoir.add(frame(i))
        means.append(sum(int.from_bytes(f.payload, "little") for f in reservoir.sample(100)) / 100)
    assert 450 < sum(means) / len(means) < 550


def test_per_source_split_keeps_quiet_sources():
    reservoir = Reservoir(90, per_source=True, seed=0)
    rng = random.Random(0)
    for i in range(20000):
        source = "busy" if rng.random() < 0.98 else rng.choice(["quiet-1", "quiet-2"])
        reservoir.add(frame(i, source))
        assert len(reservoir) <= 90
    counts = reservoir.sources()
    assert counts["busy"] == 30 and counts["quiet-1"] == 30 and counts["quiet-2"] == 30


def test_more_sources_than_slots_stays_bounded():
    reservoir = Reservoir(3, per_source=True)
    for i in range(50):
        reservoir.add(frame(i, f"cam-{i % 10}"))
        assert len(reservoir) <= 3


def test_per_frame_source_names_share_one_pool_past_max_sources():
    reservoir = Reservoir(20, per_source=True, max_sources=4)
    for i in range(2000):
        reservoir.add(frame(i, f"frame-{i}"))  # imagezmq senders often put per-frame text in msg
        assert len(reservoir) <= 20
    sources = reservoir.sources()
    assert len(sources) == 5 and sources[OVERFLOW_SOURCE] == 4  # 4 named pools + the shared one, 20 / 5 slots each
