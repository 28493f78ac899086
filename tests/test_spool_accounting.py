"""The bytes that count against spool.max_bytes are kept as a running total, not recounted from every experience."""

import os
import threading

import numpy as np

from cl_agent import ingest
from cl_agent.client import LabeledClient
from cl_agent.experience import ExperienceStore, UntrainedBytes
from cl_agent.spool import Record
from ingest_support import images, make_service, wait_until


def _cut(store: ExperienceStore, index: int, size: int) -> None:
    """A cut experience whose labeled segment holds one record of about ``size`` bytes."""
    store.spool_dir.mkdir(parents=True, exist_ok=True)
    segment = store.spool_dir / f"labeled-{index:06d}.log"
    segment.write_bytes(Record("s", index, "png", [(8, 8, 3)], [0], [b"x" * size]).to_bytes())
    store.write(index, labeled_segment=segment.name, labeled_samples=1, keys=[("s", index)], unlabeled=[], reason="count")


class _FilesystemCalls:
    """Counts, in the ingest thread only, directory listings and stats of paths under experiences/."""

    def __init__(self, monkeypatch, root):
        self.root = str(root)
        self.listings: list[str] = []
        self.stats: list[str] = []
        self.reads: list[str] = []
        for name, calls in (("listdir", self.listings), ("scandir", self.listings), ("stat", self.stats)):
            monkeypatch.setattr(os, name, self._wrap(getattr(os, name), calls))
        monkeypatch.setattr(ingest.ExperienceStore, "meta", self._wrap(ingest.ExperienceStore.meta, self.reads, index_arg=True))

    def _wrap(self, original, calls, index_arg=False):
        def counted(*args, **kwargs):
            if threading.current_thread().name == "ingest":
                where = str(args[1]) if index_arg else str(args[0]) if args else ""
                if index_arg or where.startswith(self.root):
                    calls.append(where)
            return original(*args, **kwargs)

        return counted


def test_the_periodic_refresh_looks_only_at_experiences_waiting_for_training(tmp_path, monkeypatch):
    store = ExperienceStore(tmp_path)
    for index in range(120):
        _cut(store, index, 100 + index)
    for index in range(118):
        store.mark_trained(index)
    monkeypatch.setattr(ingest, "SPOOL_RECOUNT_S", 0.0)  # refresh on every loop turn
    with make_service(tmp_path) as service:
        expected = sum(store.spool_dir.joinpath(f"labeled-{i:06d}.log").stat().st_size for i in (118, 119))
        assert service.counters()["spool_bytes"] == expected
        calls = _FilesystemCalls(monkeypatch, store.root)
        assert wait_until(lambda: len(calls.stats) >= 20, timeout_s=5.0)  # several refreshes have run
        monkeypatch.undo()
        # No listing of experiences/ and no meta.json read per refresh; only the two untrained experiences are looked at.
        assert calls.listings == [] and calls.reads == []
        looked_at = {os.path.relpath(path, store.root).split(os.sep)[0] for path in calls.stats}
        assert looked_at == {"000118", "000119"}
        store.mark_trained(119)
        assert wait_until(lambda: service.counters()["spool_bytes"] == expected - store.spool_dir.joinpath("labeled-000119.log").stat().st_size)


def test_the_running_total_matches_a_full_recount_across_cuts_and_training(tmp_path, monkeypatch):
    monkeypatch.setattr(ingest, "SPOOL_RECOUNT_S", 0.05)
    rng = np.random.default_rng(0)
    with make_service(tmp_path) as service:
        client = LabeledClient(service.endpoints["labeled"], "s")
        store = ExperienceStore(tmp_path)
        for step in range(8):
            n = int(rng.integers(1, 4))
            assert client.send(images(n, seed=step), ["a"] * n, encoding="png").ok
            cut = service.end_experience()
            if step % 3 != 2:  # training lags behind, and not always in order
                store.mark_trained(int(rng.choice(store.pending())))
            open_bytes = service.counters()["spool_bytes"] - service.spool.closed_bytes
            assert open_bytes == 0 and cut == step
            assert wait_until(lambda: service.spool.closed_bytes == UntrainedBytes(store).total, timeout_s=5.0)
        client.close()
    # a restart starts from the same total
    with make_service(tmp_path) as service:
        assert service.counters()["spool_bytes"] == UntrainedBytes(store).total > 0
