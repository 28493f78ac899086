"""The CIR benchmark: one scenario x one method x one profile, streamed to the Trainer and scored on the val set.

The learner sees the stream as the agent would: experience by experience, never
the future or the val set. After every experience the val set of the learnable
classes is scored (overall and per class). ``joint`` is the upper bound: every
labeled (and unlabeled) image of the stream, shuffled together, trained with the
total number of steps the streamed run would take, and scored once at the end.

Profiles (smoke, quick, full) are in ``cl_agent.bench_profile``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from cl_agent.bench_profile import BenchProfile
from cl_agent.config import TrainSection, to_dict
from cl_agent.scenario import ImageFolder, ScenarioTable, build_stream, val_set
from cl_agent.status import duration_text
from cl_agent.storage import atomic_write_text

JOINT = "joint"


# --------------------------------------------------------------------------- scoring


def predict_correct(trainer, images: np.ndarray, labels: np.ndarray, batch: int) -> np.ndarray:
    """1.0 where the trainer's prediction for an image is its label, else 0.0; (N,) float64."""
    import torch

    logits = trainer.predict(torch.from_numpy(images), batch_size=batch)  # (N, num_model_classes)
    return (logits.argmax(1).numpy() == labels).astype(np.float64)


def score(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[float, list]:
    """Accuracy and accuracy per class (index = class id; None for a class with no images)."""
    hits = np.bincount(labels, weights=correct, minlength=num_classes)
    counts = np.bincount(labels, minlength=num_classes)
    per_class = [float(h / n) if n else None for h, n in zip(hits, counts)]
    return float(correct.mean()), per_class


def curve_subset(labels: np.ndarray, per_class: int) -> np.ndarray | None:
    """Indices of the first ``per_class`` val images of each class (None for 0: use the whole val set)."""
    if per_class <= 0:
        return None
    rank = np.zeros(len(labels), np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    return np.flatnonzero(rank < per_class)


def forgetting(per_class_history: list[list], classes: set[int]) -> float | None:
    """Mean over ``classes`` of (best accuracy over evaluations - final accuracy); None with < 2 evaluations."""
    if len(per_class_history) < 2 or not classes:
        return None
    drops = []
    for c in sorted(classes):
        values = [row[c] for row in per_class_history if row[c] is not None]
        if values:
            drops.append(max(values) - values[-1])
    return float(np.mean(drops)) if drops else None


def streamed_steps(train: TrainSection, labeled_counts: list[int]) -> int:
    """Optimizer steps of the streamed run: sum over t of epochs(t) * steps_per_epoch(N_t), as the Trainer plans them."""
    from cl_agent.method import epochs_for, steps_per_epoch

    return sum(epochs_for(train, t) * steps_per_epoch(n, train.labeled_batch) for t, n in enumerate(labeled_counts))


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------- the run


@dataclass
class BenchRun:
    """What one benchmark run needs; ``out`` receives results.json and accuracy.png."""

    scenario: int | str  # 1, 2, 3 (or a name, for other tables)
    table: ScenarioTable
    folder: ImageFolder
    profile: BenchProfile
    method: str
    seed: int = 0
    device: str = "cpu"
    out: Path | None = None
    sources: dict = field(default_factory=dict)  # paths of the table, data and profile, recorded in the results


def _loss_terms(metrics: dict) -> dict:
    """The Trainer's mean loss terms: "loss" (total) and "loss_<term>"."""
    return {k.removeprefix("loss_"): float(v) for k, v in metrics.items() if k.startswith("loss") and isinstance(v, float)}


def _progress_line(label: str, t: int, total: int, accuracy: float | None, metrics: dict, seconds: float, eta: float) -> str:
    terms = " ".join(f"{k}={v:.3g}" for k, v in _loss_terms(metrics).items())
    acc = f"acc={accuracy:.4f}" if accuracy is not None else "acc=  -   "
    return f"[{label}] t={t + 1:>3}/{total} {acc} steps={metrics.get('steps', '?')} {terms} {seconds:.1f}s ETA {duration_text(eta)}"


def run_benchmark(run: BenchRun, echo: Callable[[str], None] = print) -> dict:
    """Train on the stream, score after every experience (once at the end for joint); write and return results."""
    import torch

    from cl_agent.trainer import Trainer

    profile = run.profile
    train = dataclasses.replace(profile.train, method=run.method)
    model, bench = profile.model, profile.bench
    if bench.threads:
        torch.set_num_threads(bench.threads)
    n_experiences = min(bench.experiences or len(run.table.experiences), len(run.table.experiences))
    label = f"s{run.scenario} {run.method} {run.sources.get('profile_name', '')}".strip()
    started = time.perf_counter()

    val_images, val_labels = val_set(run.table, run.folder, bench.eval_per_class)
    trainer = Trainer(model, train, device=run.device, seed=run.seed)
    stream = build_stream(run.table, run.folder, run.seed, limit=n_experiences)
    results = {
        "scenario": run.scenario,
        "scenario_name": run.table.name,
        "method": run.method,
        "profile": run.sources.get("profile_name", ""),
        "seed": run.seed,
        "device": device_description(run.device),
        "experiences": n_experiences,
        "val_images": int(len(val_labels)),
        "config": {"model": to_dict(model), "train": to_dict(train), "bench": to_dict(bench), **run.sources},
    }
    classes = run.table.learnable_classes
    subset = curve_subset(val_labels, bench.curve_per_class)
    if subset is not None:
        results["curve_val_images"] = int(len(subset))

    def evaluate(last: bool) -> tuple[float, list, list | None]:
        """(accuracy for the curve, per-class row for forgetting, full per-class row or None).

        With a curve subset, experiences before the last are scored on the subset only; the
        last is scored on the whole val set, and its subset row keeps forgetting comparable.
        """
        if subset is None:
            accuracy, per_class = score(predict_correct(trainer, val_images, val_labels, bench.eval_batch), val_labels, classes)
            return accuracy, per_class, per_class
        if not last:
            correct = predict_correct(trainer, val_images[subset], val_labels[subset], bench.eval_batch)
            accuracy, per_class = score(correct, val_labels[subset], classes)
            return accuracy, per_class, None
        correct = predict_correct(trainer, val_images, val_labels, bench.eval_batch)
        accuracy, per_class_full = score(correct, val_labels, classes)
        return accuracy, score(correct[subset], val_labels[subset], classes)[1], per_class_full

    accuracies, per_class_history, evaluated_after, log = [], [], [], []
    per_class_final: list = []
    seen: set[int] = set()
    total_steps = 0

    if run.method == JOINT:
        # INVARIANT: joint sees the same images as the streamed run, all at once, for the same number of steps
        experiences = list(stream)
        labeled = np.concatenate([e.labeled for e in experiences])
        labels = np.concatenate([e.labels for e in experiences])
        unlabeled = np.concatenate([e.unlabeled for e in experiences])
        rng = np.random.default_rng(run.seed)
        order = rng.permutation(len(labels))
        labeled, labels, unlabeled = labeled[order], labels[order], unlabeled[rng.permutation(len(unlabeled))]
        seen = set(labels.tolist())
        steps = streamed_steps(train, [len(e.labels) for e in experiences])
        del experiences
        budget = train.time_budget_s * n_experiences if train.time_budget_s else None
        echo(f"[{label}] joint: {len(labels)} labeled + {len(unlabeled)} unlabeled images, {steps} steps")
        t0 = time.perf_counter()
        metrics = trainer.train_experience(torch.from_numpy(labeled), torch.from_numpy(labels),
                                           torch.from_numpy(unlabeled), steps=steps, time_budget_s=budget)  # fmt: skip
        train_seconds = time.perf_counter() - t0
        accuracy, per_class, per_class_final = evaluate(last=True)
        total_steps = int(metrics.get("steps", steps))
        accuracies.append(accuracy)
        per_class_history.append(per_class)
        evaluated_after.append(n_experiences - 1)
        seconds = time.perf_counter() - t0
        log.append(_log_entry(n_experiences - 1, accuracy, metrics, seconds, train_seconds))
        echo(_progress_line(label, n_experiences - 1, n_experiences, accuracy, metrics, seconds, 0.0))
    else:
        for experience in stream:
            t0 = time.perf_counter()
            seen.update(experience.labels.tolist())
            metrics = trainer.train_experience(torch.from_numpy(experience.labeled), torch.from_numpy(experience.labels),
                                               torch.from_numpy(experience.unlabeled))  # fmt: skip
            train_seconds = time.perf_counter() - t0
            accuracy, per_class, full = evaluate(last=experience.index == n_experiences - 1)
            per_class_final = full or per_class_final
            total_steps += int(metrics.get("steps", 0))
            accuracies.append(accuracy)
            per_class_history.append(per_class)
            evaluated_after.append(experience.index)
            seconds = time.perf_counter() - t0
            log.append(_log_entry(experience.index, accuracy, metrics, seconds, train_seconds))
            done = experience.index + 1
            eta = (time.perf_counter() - started) / done * (n_experiences - done)
            echo(_progress_line(label, experience.index, n_experiences, accuracy, metrics, seconds, eta))
            if run.out is not None and done < n_experiences:
                _write(run.out, {**results, **_scores(accuracies, per_class_history, per_class_final, evaluated_after, seen),
                                 "log": log, "total_steps": total_steps, "complete": False,
                                 "wall_seconds": time.perf_counter() - started})  # fmt: skip

    results.update(_scores(accuracies, per_class_history, per_class_final, evaluated_after, seen))
    results.update(log=log, total_steps=total_steps, complete=True, wall_seconds=time.perf_counter() - started)
    if run.out is not None:
        _write(run.out, results)
        from cl_agent.comparison import plot_runs

        plot_runs([results], Path(run.out) / "accuracy.png")
    return results


def _metrics_json(metrics: dict) -> dict:
    """The Trainer's metrics, JSON-safe (scalars, and flat dicts of numbers such as loss weights)."""
    def plain(v):
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v

    kept = {}
    for k, v in metrics.items():
        if v is None or isinstance(v, (int, float, bool, str)):
            kept[k] = plain(v)
        elif isinstance(v, dict):
            kept[k] = {str(a): plain(b) for a, b in v.items() if isinstance(b, (int, float))}
    return kept


def _log_entry(t: int, accuracy: float, metrics: dict, seconds: float, train_seconds: float) -> dict:
    entry = {"t": t, "accuracy": accuracy, **_metrics_json(metrics)}
    entry.update(seconds=seconds, train_seconds=train_seconds, eval_seconds=seconds - train_seconds)
    return entry


def _scores(accuracies: list, per_class_history: list, per_class_final: list, evaluated_after: list, seen: set) -> dict:
    return {
        "accuracy_per_experience": accuracies,  # one value per evaluation; see evaluated_after
        "evaluated_after": evaluated_after,  # experience index after which each accuracy was measured
        "final_accuracy": accuracies[-1] if accuracies else None,
        "mean_accuracy": float(np.mean(accuracies)) if accuracies else None,
        "forgetting": forgetting(per_class_history, seen),
        "per_class_final": per_class_final,  # on the whole val set
        "classes_seen": sorted(seen),
    }


def _write(out: Path, results: dict) -> None:
    atomic_write_text(Path(out) / "results.json", json.dumps(results, indent=1) + "\n")
