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
  they make (``cl_agent/keyset.py``).

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build(workdir: Path, experiences: int, messages: int) -> None:
    root = workdir / "experiences"
    for index in range(experiences + 2):
        folder = root / f"{index:06d}"
        folder.mkdir(parents=True)
        keys = [["labeler", 10**15 + index * messages + k] for k in range(messages)]
        meta = {"index": index, "labeled_segment": f"{index:06d}.seg", "labeled_samples": messages * 32,
                "unlabeled_samples": 1000, "classes": [0, 1], "cut_reason": "count", "cut_at": 0.0, "keys": keys}
        (folder / "meta.json").write_text(json.dumps(meta))
        if index < experiences:
            (folder / "trained").write_text("0\n")


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

    from cl_agent.experience import ExperienceStore

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
    poll, scan = statistics.median(polls), statistics.median(scans)
    print(json.dumps({
        "experiences": args.experiences,
        "messages_per_experience": args.messages,
        "poll_ms": round(poll, 4),
        "full_scan_ms": round(scan, 2),
        "full_scan_over_poll": round(scan / poll, 1) if poll > 0 else None,
        "first_pending_ms": round(first_ms, 1),
        "committed_keys_ms": round(keys_ms, 1),
        "keys": len(keys),
        "key_runs": keys.runs(),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
