"""The CIR benchmark end to end on the smoke profile: stream, training, evaluation, results file, comparison."""

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from cl_agent.bench_profile import load_profile
from cl_agent.benchmark import BenchRun, _progress_line, forgetting, run_benchmark, streamed_steps
from cl_agent.cli import app
from cl_agent.config import ConfigError
from cl_agent.scenario import ImageFolder, parse_scenario

CLASSES, PER_CLASS_TRAIN, PER_CLASS_VAL = 5, 10, 4

TABLE = {
    "name": "synthetic",
    "num_classes": CLASSES,
    "learnable_classes": 4,  # class 4 is a distractor: unlabeled only, never scored
    "labeled_per_experience": 12,
    "unlabeled_per_experience": 8,
    "experiences": [
        {"labeled_classes": [0, 1], "unlabeled_classes": [0, 1, 4]},
        {"labeled_classes": [2, 3], "unlabeled_classes": [1, 2, 3, 4]},
        {"labeled_classes": [0, 3], "unlabeled_classes": [0, 3]},
    ],
}

RESULT_FIELDS = {
    "scenario", "method", "profile", "seed", "accuracy_per_experience", "final_accuracy", "mean_accuracy",
    "forgetting", "per_class_final", "wall_seconds", "device", "config", "evaluated_after", "total_steps",
}  # fmt: skip


def make_folder(root: Path) -> Path:
    """JPEG image folder: each class a different colour with noise, 20x20 (resized to the profile's size)."""
    rng = np.random.default_rng(0)
    lines = ["index\twnid\trole\tname"] + [f"{c}\tc{c}\t{'learnable' if c < 4 else 'distractor'}\tc{c}" for c in range(CLASSES)]
    (root / "classes.tsv").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.tsv").write_text("\n".join(lines) + "\n")
    for split, count in (("train", PER_CLASS_TRAIN), ("val", PER_CLASS_VAL)):
        for c in range(CLASSES):
            (root / split / f"c{c}").mkdir(parents=True)
            for k in range(count):
                image = np.clip(rng.normal(50 * c, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                cv2.imwrite(str(root / split / f"c{c}" / f"{k}.jpg"), image)
    return root


@pytest.fixture
def smoke_run(tmp_path) -> BenchRun:
    profile = load_profile("smoke")
    folder = ImageFolder(make_folder(tmp_path / "data"), profile.model.image_size)
    return BenchRun("synthetic", parse_scenario(TABLE), folder, profile, "mlkd_ssl", seed=0, out=tmp_path / "out")


def test_profiles_load_and_reject_unknown_keys(tmp_path):
    for name in ("smoke", "quick", "full", "quick_x1", "quick_ema_snapshots"):
        profile = load_profile(name)
        assert profile.model.image_size in (16, 32, 64)
    # The study profiles differ from quick only where their names say.
    quick, x1, ema = load_profile("quick"), load_profile("quick_x1"), load_profile("quick_ema_snapshots")
    assert (quick.train.epochs_base, quick.train.epochs_min, x1.train.epochs_base, x1.train.epochs_min) == (4, 3, 2, 1)
    assert ema.train.snapshot_mode == "ema" and quick.train.snapshot_mode == x1.train.snapshot_mode == "frozen"
    assert dataclasses.replace(x1.train, epochs_base=4, epochs_min=3) == quick.train and x1.bench == quick.bench
    assert load_profile("full").train.epochs_base == 74 and load_profile("full").train.epochs_min == 25
    bad = tmp_path / "bad.yaml"
    bad.write_text("bench:\n  experiences: 2\n  evaluation_cap: 3\n")
    with pytest.raises(ConfigError, match="bench.evaluation_cap.*unknown key"):
        load_profile(bad)
    bad.write_text("train:\n  epochs_base: 0\n")
    with pytest.raises(ConfigError, match="train.epochs_base"):
        load_profile(bad)


def test_forgetting_is_best_minus_final_over_seen_classes():
    history = [[0.5, None, 0.0], [0.2, 0.4, 0.0], [0.3, 0.4, 0.9]]
    assert forgetting(history, {0, 1}) == pytest.approx(((0.5 - 0.3) + 0.0) / 2)
    assert forgetting(history[:1], {0}) is None  # one evaluation: nothing to forget from


def test_smoke_streamed_run_end_to_end(smoke_run):
    fed = []  # what the learner was given, in order
    import cl_agent.trainer as trainer_module

    real = trainer_module.Trainer.train_experience

    def spy(self, labeled, labels, unlabeled, **kwargs):
        fed.append((self.experience_index, sorted(set(labels.tolist())), len(unlabeled), kwargs))
        return real(self, labeled, labels, unlabeled, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module.Trainer, "train_experience", spy)
        results = run_benchmark(smoke_run, echo=lambda line: None)

    # experience by experience, in order, nothing but the stream's labeled classes
    assert [f[0] for f in fed] == [0, 1, 2]
    assert [f[1] for f in fed] == [[0, 1], [2, 3], [0, 3]]
    assert all(f[2] == 8 and f[3] == {} for f in fed)

    on_disk = json.loads((smoke_run.out / "results.json").read_text())
    assert RESULT_FIELDS <= set(on_disk) and on_disk["complete"] is True
    assert on_disk["method"] == "mlkd_ssl" and on_disk["config"]["train"]["method"] == "mlkd_ssl"
    accuracies = on_disk["accuracy_per_experience"]
    assert len(accuracies) == 3 and all(0.0 <= a <= 1.0 for a in accuracies)
    assert on_disk["evaluated_after"] == [0, 1, 2]
    assert on_disk["final_accuracy"] == accuracies[-1]
    assert on_disk["mean_accuracy"] == pytest.approx(np.mean(accuracies))
    assert on_disk["forgetting"] is not None and on_disk["forgetting"] >= 0
    assert len(on_disk["per_class_final"]) == 4  # learnable classes only
    assert on_disk["val_images"] == 4 * 2  # smoke caps the val set at 2 images per class
    assert on_disk["total_steps"] == streamed_steps(smoke_run.profile.train, [12, 12, 12])
    assert (smoke_run.out / "accuracy.png").stat().st_size > 1000
    assert results["final_accuracy"] == on_disk["final_accuracy"]


def test_joint_same_steps_scored_once(smoke_run):
    run = dataclasses.replace(smoke_run, method="joint")
    results = run_benchmark(run, echo=lambda line: None)
    assert results["accuracy_per_experience"] == [results["final_accuracy"]]
    assert results["evaluated_after"] == [2]
    assert results["forgetting"] is None
    assert results["total_steps"] == streamed_steps(run.profile.train, [12, 12, 12])


def test_cli_on_shared_data_and_compare(shared_dir, tmp_path):
    runner = CliRunner()
    out = tmp_path / "s1"
    args = ["bench", "cir", "--scenario", "1", "--method", "naive", "--profile", "smoke", "--out", str(out),
            "--data", str(shared_dir / "datasets" / "tiny-imagenet-130"), "--scenarios", str(shared_dir / "scenarios"),
            "--device", "cpu"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "t=  3/3" in result.output and "ETA" in result.output
    results = json.loads((out / "results.json").read_text())
    assert RESULT_FIELDS <= set(results) and results["scenario"] == 1 and results["profile"] == "smoke"
    assert len(results["accuracy_per_experience"]) == 3 and results["val_images"] == 200
    assert results["config"]["data"].endswith("tiny-imagenet-130")

    compare = runner.invoke(app, ["bench", "compare", str(out), str(out), "--out", str(tmp_path / "c.png")])
    assert compare.exit_code == 0, compare.output
    assert "| s1 | naive | smoke | 3 |" in compare.output
    assert "| method | s1 | mean |" in compare.output and "| naive | " in compare.output
    assert (tmp_path / "c.png").is_file()


def test_cli_reports_bad_input(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "cir", "--scenario", "1", "--profile", "nope", "--out", str(tmp_path),
                                 "--data", str(tmp_path), "--scenarios", str(tmp_path)])  # fmt: skip
    assert result.exit_code != 0 and "unknown bench profile 'nope'" in str(result.exception)


def test_curve_subset_before_the_last_experience(smoke_run):
    """With curve_per_class, the curve's early points use a class-balanced subset; the final score uses all."""
    profile = dataclasses.replace(smoke_run.profile, bench=dataclasses.replace(smoke_run.profile.bench, curve_per_class=1))
    results = run_benchmark(dataclasses.replace(smoke_run, profile=profile), echo=lambda line: None)
    assert results["curve_val_images"] == 4 and results["val_images"] == 8
    assert len(results["accuracy_per_experience"]) == 3
    assert results["final_accuracy"] == results["accuracy_per_experience"][-1]
    assert len(results["per_class_final"]) == 4 and all(a in (0.0, 0.5, 1.0) for a in results["per_class_final"])


@pytest.mark.parametrize(("eta", "text"), [(45.0, "ETA 45s"), (185.0, "ETA 3m05s"), (3720.0, "ETA 1h02m")])
def test_progress_line_writes_the_eta_as_status_and_the_live_view_do(eta, text):
    line = _progress_line("naive", 2, 10, 0.5, {"steps": 4, "loss": 1.25}, 3.0, eta)
    assert line == f"[naive] t=  3/10 acc=0.5000 steps=4 loss=1.25 3.0s {text}"
