"""Benchmark results side by side: accuracy-over-experiences plot and a markdown table."""

from __future__ import annotations

import json
from pathlib import Path

from cl_agent.errors import CLAgentError


def load_results(path: str | Path) -> dict:
    """A run's results: ``DIR/results.json`` or a results JSON file itself."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise CLAgentError(f"no results.json in {path}")
    try:
        results = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CLAgentError(f"{file}: not valid JSON: {e}") from None
    missing = [k for k in ("method", "scenario", "accuracy_per_experience", "final_accuracy") if k not in results]
    if missing:
        raise CLAgentError(f"{file}: not a benchmark results file (missing {', '.join(missing)})")
    return results


def run_label(results: dict) -> str:
    partial = "" if results.get("complete", True) else " (partial)"
    return f"s{results['scenario']} {results['method']} [{results.get('profile', '')}]{partial}"


def plot_runs(runs: list[dict], path: str | Path, title: str = "CIR benchmark: val accuracy over experiences") -> Path:
    """One line per run (a single marker for runs scored only at the end, such as joint); writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for results in runs:
        x = [t + 1 for t in results.get("evaluated_after", range(len(results["accuracy_per_experience"])))]
        y = [100 * a for a in results["accuracy_per_experience"]]
        style = {"marker": "*", "markersize": 12, "linestyle": "none"} if len(x) == 1 else {"linewidth": 1.6}
        ax.plot(x, y, label=run_label(results), **style)
    ax.set_xlabel("experience")
    ax.set_ylabel("val accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def markdown_table(runs: list[dict]) -> str:
    """Final / mean accuracy, forgetting (points) and wall time per run."""
    lines = [
        "| scenario | method | profile | experiences | final acc (%) | mean acc (%) | forgetting (pts) | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        done = len(r.get("log", [])) if r.get("complete", True) is False else r.get("experiences", "?")
        wall = r.get("wall_seconds")
        wall_text = "-" if wall is None else f"{wall / 60:.1f} min"
        lines.append(
            f"| s{r['scenario']} | {r['method']} | {r.get('profile', '')} | {done} | {_pct(r['final_accuracy'])} "
            f"| {_pct(r.get('mean_accuracy'))} | {_pct(r.get('forgetting'))} | {wall_text} |"
        )
    return "\n".join(lines)


def method_scenario_table(runs: list[dict]) -> str:
    """Final accuracy (%) per method x scenario, with the mean over scenarios when a method has all three."""
    scenarios = sorted({str(r["scenario"]) for r in runs})
    methods = list(dict.fromkeys(r["method"] for r in runs))
    final = {(r["method"], str(r["scenario"])): r["final_accuracy"] for r in runs if r.get("complete", True)}
    header = "| method | " + " | ".join(f"s{s}" for s in scenarios) + " | mean |"
    lines = [header, "|" + " --- |" * (len(scenarios) + 2)]
    for m in methods:
        values = [final.get((m, s)) for s in scenarios]
        complete = len(scenarios) == 3 and all(v is not None for v in values)
        mean = sum(values) / 3 if complete else None
        lines.append(f"| {m} | " + " | ".join(_pct(v) for v in values) + f" | {_pct(mean)} |")
    return "\n".join(lines)
