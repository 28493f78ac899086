"""What the experience store costs a long-running agent: polls for pending experiences, and the start.

    python tools/bench_store.py [--experiences 10000] [--messages 100] [--polls 20]

Builds a working directory with ``--experiences`` cut and trained experiences (each one a
``meta.json`` listing ``--messages`` (sender, seq) keys and a ``trained`` marker, as the agent
leaves them; no image data) and two pending ones, then measures in one run:

- ``poll_ms``: one ``ExperienceStore.pending()`` after the first (the agent and the trainer
  each poll about twice a second), median over ``--polls``;
- ``full_scan_ms``: the same answer found by listing every experience and checking each for
  its marker (what a poll cost before it looked only at new and untrained ones), median;
- ``first_pending_ms``: the first ``pending()`` of a fresh store (the one full scan, at start);
- ``committed_keys_ms``: reading every experience's keys at start, with the number of runs
  they make (``cl_agent/keyset.py``), as a start without a key summary does;
  ``committed_keys_summary_ms``: the same keys from the summary the ingest process rewrites
  after each cut (``experiences/keys.json``), as a start finds the store;
- ``start_ms``: all the store work of the ingest process's start with that summary (listing
  the store, the first ``pending()`` and the untrained bytes, retention's look at each trained
  experience, the keys), on a fresh store object; ``start_without_summary_ms`` the same
  without ``keys.json`` (a first start after an upgrade, or a damaged summary);
- ``records_tail_ms``: what the agent and the trainer read of ``experiences.jsonl`` (one record
  per experience, 100 classes' online accuracy each) at start: the newest record, and which
  of the pending experiences a record covers; against ``records_full_read_ms``, reading the
  whole file, as they did before; ``records_*_peak_mb`` the memory each took at its peak
  (tracemalloc, in a separate call from the timed one).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path


def build(workdir: Path, experiences: int, messages: int) -> None:
    from cl_agent.status import EXPERIENCES_FILE

    root = workdir / "experiences"
    records = open(workdir / EXPERIENCES_FILE, "w")
    for index in range(experiences + 2):
        folder = root / f"{index:06d}"
        folder.mkdir(parents=True)
        keys = [["labeler", 10**15 + index * messages + k] for k in range(messages)]
        meta = {"index": index, "labeled_segment": f"{index:06d}.seg", "labeled_samples": messages * 32,
                "unlabeled_samples": 1000, "classes": [0, 1], "cut_reason": "count", "cut_at": 0.0, "keys": keys}
        (folder / "meta.json").write_text(json.dumps(meta))
        if index < experiences:
            (folder / "trained").write_text("0\n")
            records.write(json.dumps(record(index)) + "\n")
    records.close()


def record(index: int) -> dict:
    """An experience record of the size the agent writes with 100 classes."""
    return {
        "experience": index, "time": "2026-01-01T00:00:00.000Z", "labeled": 3200, "unlabeled": 1000,
        "merged": [index], "online_accuracy": 0.5, "online_correct": 1600, "online_total": 3200,
        "online_accuracy_per_class": {f"class_{c}": 0.5 for c in range(100)},
        "losses": {"ce": 0.5, "mlkd": 0.1, "ssl": 0.3, "total": 0.9}, "update_seconds": 120.0,
        "export_seconds": 2.5, "version": index + 1, "stopped_by_budget": False, "backlog": 0, "recovered": False,
    }


def peak_mb(call) -> float:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def timed(call) -> tuple[float, object]:
    started = time.perf_counter()
    result = call()
    return (time.perf_counter() - started) * 1000, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiences", type=int, default=10_000, help="trained experiences in the store (default 10000)")
    parser.add_argument("--messages", type=int, default=100, help="labeled messages per experience (default 100)")
    parser.add_argument("--polls", type=int, default=20, help="polls of each kind to take the median of (default 20)")
    args = parser.parse_args(argv)
    if args.experiences < 0 or args.messages < 1 or args.polls < 1:
        parser.error("--experiences must be >= 0, --messages and --polls >= 1")

    from cl_agent.experience import ExperienceStore, UntrainedBytes
    from cl_agent.retention import KEEP_ALL, TrainedRetention
    from cl_agent.status import read_experience_records, recorded_since, records_backwards

    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        workdir = Path(tmp)
        print(f"building {args.experiences} experiences ...", file=sys.stderr)
        build(workdir, args.experiences, args.messages)
        store = ExperienceStore(workdir)
        first_ms, pending = timed(store.pending)
        expected = [args.experiences, args.experiences + 1]
        if pending != expected:
            raise SystemExit(f"pending() gave {pending}, expected {expected}")
        polls, scans = [], []
        for _ in range(args.polls):  # alternating, so the two see the same state of the machine
            polls.append(timed(store.pending)[0])
            ms, found = timed(lambda: [i for i in store.indices() if not store.is_trained(i)])
            scans.append(ms)
            if found != expected:
                raise SystemExit(f"the full scan gave {found}, expected {expected}")
        keys_ms, keys = timed(ExperienceStore(workdir).committed_keys)

        def start():
            fresh = ExperienceStore(workdir)  # as IngestService._setup does it
            cut = fresh.indices()
            untrained = UntrainedBytes(fresh, cut)
            TrainedRetention(fresh, KEEP_ALL, [i for i in cut if i not in untrained.sizes])
            return fresh.committed_keys(cut)

        no_summary_ms, _ = timed(start)
        store.save_keys(expected[-1], keys)  # what the ingest process leaves after its last cut
        summary_ms, from_summary = timed(ExperienceStore(workdir).committed_keys)
        if from_summary.to_runs() != keys.to_runs():
            raise SystemExit("the keys read through the summary differ from those read from every experience")
        start_ms, _ = timed(start)

        def tail():
            return next(records_backwards(workdir), None), recorded_since(workdir, expected[0])

        tail_ms, _ = timed(tail)
        full_ms, _ = timed(lambda: read_experience_records(workdir))
        tail_mb, full_mb = peak_mb(tail), peak_mb(lambda: read_experience_records(workdir))
    poll, scan = statistics.median(polls), statistics.median(scans)
    print(json.dumps({
        "experiences": args.experiences,
        "messages_per_experience": args.messages,
        "poll_ms": round(poll, 4),
        "full_scan_ms": round(scan, 2),
        "full_scan_over_poll": round(scan / poll, 1) if poll > 0 else None,
        "first_pending_ms": round(first_ms, 1),
        "committed_keys_ms": round(keys_ms, 1),
        "committed_keys_summary_ms": round(summary_ms, 2),
        "start_ms": round(start_ms, 1),
        "start_without_summary_ms": round(no_summary_ms, 1),
        "keys": len(keys),
        "key_runs": keys.runs(),
        "records_tail_ms": round(tail_ms, 2),
        "records_full_read_ms": round(full_ms, 1),
        "records_tail_peak_mb": round(tail_mb, 2),
        "records_full_read_peak_mb": round(full_mb, 1),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
