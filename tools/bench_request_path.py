"""Per-request Python steps of batch-1 serving, warm and right after a ``session.run``.

    python tools/bench_request_path.py --json

Prints one JSON object: the median microseconds of each step, measured in a loop
where each call either follows the previous one (``warm``) or follows a batch-1
``session.run`` of the benchmark's ResNet-18 (``after_run``), which streams its
45 MB of weights through the caches as the server's run does before it answers.
Each step in two forms: ``generic`` (the wire layer's general functions, and
numpy's argsort for the top-k, as the serving path used them before) and
``lean`` (what the server and ``InferenceClient`` use now).

``run_after_gap``: the median batch-1 ``session.run`` (ms) right after a gap of
``gap_us`` microseconds in which this thread either spins in Python (``spin_ms``)
or sleeps (``sleep_ms``); gap 0 is back to back. A served request always has such
a gap between two runs (the round trip), so this is the part of the server's
overhead over a back-to-back bare call that no serving code can remove.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serve import CLASSES, SIZE, bare_session, build_models, optimized_path  # noqa: E402


def steps(probs: np.ndarray, image: np.ndarray) -> dict:
    from cl_agent.config import WireSection
    from cl_agent.server import _predictions_json, _ranked
    from cl_agent.wire import decode_message, decode_reply, encode_message, pack_message, prediction_reply, reply

    limits = WireSection()
    names_json = [json.dumps(name) for name in CLASSES]
    top_k = 5

    def generic_top_k_reply():
        order = np.argsort(-probs, axis=1)[:, :top_k].tolist()
        values = probs.tolist()
        predictions = [[[CLASSES[c], values[i][c]] for c in order[i]] for i in range(len(order))]
        return reply("prediction", "server", 17, model="student", model_version=3, predictions=predictions)

    def lean_top_k_reply():
        return prediction_reply("server", 17, "student", 3, _predictions_json(_ranked(probs, top_k), top_k, names_json))

    answer = generic_top_k_reply()
    assert json.loads(answer[0])["predictions"] == json.loads(lean_top_k_reply()[0])["predictions"]
    return {
        "server_top_k_and_reply": {"generic": generic_top_k_reply, "lean": lean_top_k_reply},
        "client_encode": {
            "generic": lambda: encode_message("infer", "client-1", 17, list(image), encoding="raw"),
            "lean": lambda: pack_message("infer", "client-1", 17, [i.tobytes() for i in image], encoding="raw", shapes=[image.shape[1:]]),
        },
        "client_reply_check": {
            "generic": lambda: [[(str(n), float(p)) for n, p in row] for row in decode_message(answer, limits).header["predictions"]],
            "lean": lambda: [[(str(n), float(p)) for n, p in row] for row in decode_reply(answer, limits)["predictions"]],
        },
    }


def run_after_gap(session, image: np.ndarray, gaps_us: list[int], rounds: int, per_round: int = 20) -> dict:
    """Median ``session.run`` (ms) after each gap, spinning and sleeping; the conditions interleave by round."""
    clock = time.perf_counter
    samples = {(gap, how): [] for gap in gaps_us for how in ("spin", "sleep") if gap or how == "spin"}
    for _ in range(per_round):
        session.run(["probs"], {"images": image})
    for _ in range(rounds):
        for gap, how in samples:
            for _ in range(per_round):
                if how == "sleep":
                    time.sleep(gap / 1e6)
                else:
                    until = clock() + gap / 1e6
                    while clock() < until:
                        pass
                started = clock()
                session.run(["probs"], {"images": image})
                samples[gap, how].append(clock() - started)
    result: dict = {}
    for (gap, how), times in samples.items():
        result.setdefault(str(gap), {})[how + "_ms"] = round(float(np.median(times)) * 1e3, 4)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--calls", type=int, default=1000, help="calls of each step per condition")
    parser.add_argument("--repeats", type=int, default=2, help="passes over both conditions (each pass reported)")
    parser.add_argument("--gaps", default="0,20,50,100,200,400,800", help="gaps (us) before a run, comma-separated, for run_after_gap")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-request-") as tmp:
        _, paths = build_models(Path(tmp), threads=1, count=1)
        session = bare_session(optimized_path(paths[0]), threads=1, pre_optimized=True)
        image = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
        (probs,) = session.run(["probs"], {"images": image})
        table = steps(probs, image)
        passes = []
        for _ in range(args.repeats):
            result = {}
            for condition in ("warm", "after_run"):
                times = {(step, form): [] for step, forms in table.items() for form in forms}
                for _ in range(args.calls):
                    for (step, form), samples in times.items():
                        if condition == "after_run":
                            session.run(["probs"], {"images": image})
                        started = time.perf_counter()
                        table[step][form]()
                        samples.append(time.perf_counter() - started)
                for (step, form), samples in times.items():
                    result.setdefault(step, {}).setdefault(form, {})[condition + "_us"] = round(float(np.median(samples)) * 1e6, 1)
            passes.append(result)
        after_gap = run_after_gap(session, image, [int(g) for g in args.gaps.split(",")], max(1, args.calls // 20))
    report = {
        "model": "resnet18 (cl_agent.student) at 32 px, 10 classes, top_k 5", "calls": args.calls, "passes": passes, "run_after_gap": after_gap,
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
