"""The benchmark tools run end to end and print the JSON their docs describe (slow: each exports a ResNet-18)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_contention_runs_one_round_of_every_condition():
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_contention.py"), "--json", "--rounds", "1"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout)
    conditions = {"idle", "hash_full_speed", "hash_paced", "copy_full_speed", "copy_paced"}
    assert set(report["p99_ms"]) == conditions
    assert all(len(p99s) == 1 and p99s[0] > 0 for p99s in report["p99_ms"].values())
