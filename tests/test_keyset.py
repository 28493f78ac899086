"""KeySet: the (sender, seq) keys of stored messages as runs of consecutive seqs."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from cl_agent.keyset import KeySet


def test_matches_a_set_for_any_order_of_insertions():
    rng = random.Random(0)
    for trial in range(50):
        keys = [(rng.choice("abc"), rng.randrange(40)) for _ in range(rng.randrange(1, 120))]
        held, oracle = KeySet(), set()
        for key in keys:
            held.add(key)
            oracle.add(key)
            assert len(held) == len(oracle)
        assert set(held) == oracle
        for sender in "abcd":
            for seq in range(-2, 44):
                assert ((sender, seq) in held) == ((sender, seq) in oracle), (trial, sender, seq)


def test_consecutive_seqs_are_one_run_per_sender_and_gaps_start_new_ones():
    keys = KeySet((("cam", 1_000 + i) for i in range(10_000)))
    keys.update(("op", 5 + i) for i in range(3))
    assert len(keys) == 10_003 and keys.runs() == 2
    assert ("cam", 999) not in keys and ("cam", 11_000) not in keys and ("cam", 5_000) in keys
    keys.add(("cam", 20_000))  # a restarted client numbers from elsewhere
    assert keys.runs() == 3
    keys.add(("cam", 11_001))  # one message given up on (11_000) leaves a gap ...
    assert keys.runs() == 4
    keys.add(("cam", 11_000))  # ... until its retry arrives and joins the runs on both sides
    assert keys.runs() == 3 and len(keys) == 10_006
    keys.add(("cam", 11_000))  # a duplicate changes nothing
    assert keys.runs() == 3 and len(keys) == 10_006


def test_memory_grows_with_runs_not_with_messages():
    def allocated(build) -> int:
        tracemalloc.start()
        held = build()
        size = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del held
        return size

    messages = [(f"cam-{i % 4}", 10**15 + i // 4) for i in range(100_000)]  # four senders, interleaved
    as_set = allocated(lambda: {(str(s), int(q)) for s, q in messages})
    as_runs = allocated(lambda: KeySet(messages))
    assert as_runs * 100 < as_set, (as_runs, as_set)


def test_runs_round_trip_as_plain_data_and_bad_runs_are_refused():
    keys = KeySet([("cam", 1), ("cam", 2), ("cam", 5), ("arm", 0)])
    runs = keys.to_runs()
    assert runs == {"cam": [[1, 2], [5, 5]], "arm": [[0, 0]]}
    again = KeySet.from_runs(runs)
    assert set(again) == set(keys) and len(again) == 4 and again.runs() == 3
    again.add(("cam", 3))
    assert again.to_runs()["cam"] == [[1, 3], [5, 5]]
    for bad, named in [
        ([[1, 2]], "object"),
        ({"cam": [[2, 1]]}, r"\[2, 1\]"),
        ({"cam": [[1, 2], [3, 4]]}, r"\[3, 4\] is not after"),  # adjacent: must have been one run
        ({"cam": [[5, 6], [1, 2]]}, r"\[1, 2\] is not after"),
        ({"cam": [[1, "2"]]}, "integers"),
        ({"cam": [[True, 2]]}, "integers"),
        ({"cam": "1-2"}, "must be a list"),
    ]:
        with pytest.raises(ValueError, match=named):
            KeySet.from_runs(bad)
