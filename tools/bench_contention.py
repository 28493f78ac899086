"""How much a publish's or a loader's file work next to a server slows its requests.

Starts `cl-agent serve` on the benchmark's ResNet-18 (as tools/bench_serve.py does) and runs
an open-loop load of batch-1 requests at ``--rate``. In each load run a thread at nice 10 (as
the trainer and the server's loader run) repeats one kind of work ten times, 0.3 s apart,
on the two files a publish copies (``model.onnx`` and the optimised graph's weights):

- ``idle``: nothing (the steady reference);
- ``hash``: ``repository.sha256_file`` of both files (what the server's loader does);
- ``copy``: ``repository._copy_hashed`` of both (what a publish does: copy, hash, fsync);

each at full speed (pause 0) and with ``--pause-us`` (the default of ``serve.loader_pause_us``
and ``repository.publish_pause_us``). Conditions alternate for ``--rounds`` rounds; the JSON
gives every run's p99 and the median per condition.

    .venv/bin/python tools/bench_contention.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_serve  # noqa: E402  (the benchmark's model, server start-up and load generator)


def main() -> int:
    from cl_agent.config import ServeSection
    from cl_agent.inference import InferenceClient
    from cl_agent.repository import ModelRepository, OptimizedModel, _copy_hashed, sha256_file
    from cl_agent.session import runtime_environment

    serve = ServeSection()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of all conditions, alternating")
    parser.add_argument("--rate", type=float, default=250.0, help="requests/s of the load")
    parser.add_argument("--pause-us", type=int, default=serve.loader_pause_us, help="pause after each 256 KiB in the paced conditions")
    args = parser.parse_args()
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))

    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        tmp = Path(tmp)
        say("exporting the model ...")
        _, paths = bench_serve.build_models(tmp, 1, count=1)
        optimized = OptimizedModel(bench_serve.optimized_path(paths[0]), runtime_environment())
        files = [paths[0], optimized.data_path]
        repo = ModelRepository(tmp / "models", "student")
        repo.publish(paths[0], {"class_names": bench_serve.CLASSES, "image_size": bench_serve.SIZE}, optimized)
        endpoint = f"tcp://127.0.0.1:{bench_serve.free_port()}"
        announce = f"tcp://127.0.0.1:{bench_serve.free_port()}"
        server = bench_serve.start_server(tmp / "models", endpoint, announce, 1, serve.busy_poll_us, serve.max_wait_ms, serve.loader_pause_us)
        scratch = tmp / "scratch"
        scratch.mkdir()

        def hash_files(pause_s: float) -> None:
            for f in files:
                sha256_file(f, pause_s)

        def copy_files(pause_s: float) -> None:
            for k, f in enumerate(files):
                _copy_hashed(f, scratch / f"{k}", pause_s)
            for f in scratch.iterdir():
                f.unlink()

        def repeated(work, pause_s: float):
            def during() -> None:
                def run() -> None:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
                    time.sleep(0.3)
                    for _ in range(10):
                        work(pause_s)
                        time.sleep(0.3)

                thread = threading.Thread(target=run)
                thread.start()
                thread.join()

            return during

        pause_s = args.pause_us / 1e6
        conditions = {
            "idle": lambda: time.sleep(4.0),
            "hash_full_speed": repeated(hash_files, 0.0),
            "hash_paced": repeated(hash_files, pause_s),
            "copy_full_speed": repeated(copy_files, 0.0),
            "copy_paced": repeated(copy_files, pause_s),
        }
        p99: dict[str, list[float]] = {name: [] for name in conditions}
        try:
            with InferenceClient(endpoint, timeout_s=2, retries=30) as client:
                client.predict(np.zeros((1, bench_serve.SIZE, bench_serve.SIZE, 3), np.uint8))  # waits until it is up
            for r in range(args.rounds):
                for name, during in conditions.items():
                    summary = bench_serve.summarise([bench_serve.run_load(endpoint, args.rate, during)])
                    if summary["failed_requests"]:
                        raise SystemExit(f"{summary['failed_requests']} failed requests in {name}")
                    p99[name].append(summary["p99_ms"])
                    say(f"round {r + 1} {name}: p99 {summary['p99_ms']:.2f} ms")
        finally:
            server.terminate()
            server.communicate(timeout=30)
    report = {
        "model": "resnet18 (cl_agent.student) at 32 px, fp32, CPUExecutionProvider, 1 intra-op thread",
        "machine": f"{os.uname().machine}, {os.cpu_count()} cores",
        "rate_per_s": args.rate,
        "pause_us": args.pause_us,
        "rounds": args.rounds,
        "p99_ms_median": {name: round(statistics.median(v), 2) for name, v in p99.items()},
        "p99_ms": {name: [round(x, 2) for x in v] for name, v in p99.items()},
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
