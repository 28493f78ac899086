"""Bench profiles: the ``model`` and ``train`` sections the Trainer takes, plus a ``bench`` section.

A profile is ``configs/bench/<name>.yaml`` (smoke, quick, full) or any YAML file of that form;
unknown keys and bad values are rejected with the key, the value and the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cl_agent.config import ConfigError, ModelSection, TrainSection, _range, build
from cl_agent.errors import CLAgentError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "configs" / "bench"


@dataclass
class BenchSection:
    experiences: int = field(default=0, metadata=_range(ge=0))  # experiences to run from the start of the stream; 0 = all
    eval_per_class: int = field(default=0, metadata=_range(ge=0))  # val images per class scored; 0 = all
    curve_per_class: int = field(default=0, metadata=_range(ge=0))  # >0: before the last experience, score only this many per class (CPU time); 0 = the full val set every time
    eval_batch: int = field(default=256, metadata=_range(ge=1))  # images per predict() call
    threads: int = field(default=0, metadata=_range(ge=0))  # torch CPU threads; 0 = torch's default


@dataclass
class BenchProfile:
    model: ModelSection = field(default_factory=ModelSection)  # the student (image_size is the benchmark's too)
    train: TrainSection = field(default_factory=TrainSection)  # the update (train.method is set by --method)
    bench: BenchSection = field(default_factory=BenchSection)  # stream length, evaluation


def profile_path(name: str | Path) -> Path:
    """A profile name (smoke, quick, full: ``configs/bench/<name>.yaml``) or a path to a YAML file."""
    path = Path(name)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        return path
    for folder in (PROFILES_DIR, Path.cwd() / "configs" / "bench"):
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
    raise CLAgentError(f"unknown bench profile {str(name)!r} (known: {', '.join(known) or 'none found'})")


def portable_path(path: str | Path) -> str:
    """``path`` relative to the repository root when it lies beside it (``../shared/...``), so results carry no machine paths."""
    path, root = Path(path).resolve(), PROFILES_DIR.parents[1]
    return os.path.relpath(path, root) if path.is_relative_to(root.parent) else str(path)


def load_profile(name: str | Path) -> BenchProfile:
    """Load a bench profile; unknown keys and bad values raise ConfigError naming the key."""
    path = profile_path(name)
    if not path.is_file():
        raise ConfigError("<file>", str(path), str(path), "profile file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError("<file>", str(path), str(path), f"not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError("<file>", type(data).__name__, str(path), "top level must be a mapping of sections")
    return build(BenchProfile, data, str(path))
