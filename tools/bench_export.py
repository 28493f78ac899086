"""Export and publish cost with and without the optimised graph (``export.save_optimized``).

    python tools/bench_export.py [--rounds 3]

Exports the ResNet-18 student at 32 px with ``export_onnx`` (dynamo export, ONNX checker,
parity check) and publishes it to a temporary repository, alternating without and with the
optimised graph; prints one JSON object with the medians in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="exports of each kind")
    args = parser.parse_args()

    from cl_agent.config import ExportSection, ModelSection
    from cl_agent.export import export_onnx
    from cl_agent.repository import OPTIMIZED_FILE, ModelRepository, OptimizedModel
    from cl_agent.session import runtime_environment
    from cl_agent.student import create_student

    section = ModelSection(backbone="resnet18", num_classes=10, image_size=32)
    student = create_student(section).eval()
    manifest = {"class_names": [f"class_{i}" for i in range(10)], "image_size": 32}
    times: dict[str, list[float]] = {f"{kind}_{step}_ms": [] for kind in ("plain", "optimized") for step in ("export", "publish")}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        repo = ModelRepository(Path(tmp) / "models", "student", keep_last=2)
        for k in range(args.rounds):
            for kind in ("plain", "optimized"):
                folder = Path(tmp) / f"{kind}-{k}"
                folder.mkdir()
                path, optimized = folder / "model.onnx", (folder / OPTIMIZED_FILE if kind == "optimized" else None)
                started = time.perf_counter()
                export_onnx([student], path, image_size=32, mean=section.mean, std=section.std, export=ExportSection(), optimized_path=optimized)
                exported = time.perf_counter()
                repo.publish(path, manifest, OptimizedModel(optimized, runtime_environment()) if optimized else None)
                times[f"{kind}_export_ms"].append(1000 * (exported - started))
                times[f"{kind}_publish_ms"].append(1000 * (time.perf_counter() - exported))
    report = {key: round(float(np.median(values)), 1) for key, values in times.items()}
    report["rounds"] = args.rounds
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
