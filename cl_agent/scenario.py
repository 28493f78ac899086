"""CIR scenarios: class schedules (JSON tables) over an image-folder dataset, turned into a stream.

A scenario table says, per experience, which classes appear labeled and which
unlabeled, and how many images each experience carries. An image folder is a
``classes.tsv`` (``index  wnid  role  name``) beside ``train`` and ``val`` splits,
each either a directory tree (``train/<wnid>/<file>``) or a tar of that tree
(``train.tar``), read member by member without extracting.

Stream rules (``build_stream``):
- ``labeled_per_experience`` images are split equally among ``labeled_classes``,
  ``unlabeled_per_experience`` equally among ``unlabeled_classes``; when the
  division leaves a remainder, that many classes (picked with the seed) get one more.
- Every class has one pool of train images, shared by labeled and unlabeled draws,
  walked in a seeded random order: an image is drawn again only once every image of
  its class has been used (then a fresh order starts).
"""

from __future__ import annotations

import csv
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from cl_agent.errors import CLAgentError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".bmp", ".webp")


class ScenarioError(CLAgentError):
    """A scenario table or image folder that cannot be used, with what was wrong."""


# --------------------------------------------------------------------------- default locations


def default_shared_dir() -> Path | None:
    """``../shared`` beside the repository (from the package location, then the working directory)."""
    candidates = [Path(__file__).resolve().parents[2] / "shared", Path.cwd().resolve().parent / "shared"]
    return next((p for p in candidates if p.is_dir()), None)


def default_data_dir() -> Path | None:
    shared = default_shared_dir()
    return shared / "datasets" / "tiny-imagenet-130" if shared else None


def default_scenarios_dir() -> Path | None:
    shared = default_shared_dir()
    return shared / "scenarios" if shared else None


# --------------------------------------------------------------------------- scenario tables


@dataclass(frozen=True)
class ExperienceSpec:
    labeled_classes: tuple[int, ...]  # class ids shown with labels in this experience
    unlabeled_classes: tuple[int, ...]  # class ids the unlabeled images come from (distractors included)


@dataclass(frozen=True)
class ScenarioTable:
    name: str
    num_classes: int  # classes that appear anywhere (learnable + distractors)
    learnable_classes: int  # ids 0 .. learnable_classes-1 can be labeled and are tested
    labeled_per_experience: int
    unlabeled_per_experience: int
    experiences: tuple[ExperienceSpec, ...]


def _int_field(data: dict, key: str, source: str, minimum: int) -> int:
    if key not in data:
        raise ScenarioError(f"{source}: missing key '{key}'")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ScenarioError(f"{source}: '{key}' = {value!r}: expected an integer >= {minimum}")
    return value


def _class_list(value, where: str, limit: int, allow_empty: bool) -> tuple[int, ...]:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise ScenarioError(f"{where} = {value!r}: expected a {'' if allow_empty else 'non-empty '}list of class ids")
    for c in value:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < limit:
            raise ScenarioError(f"{where}: class id {c!r} is not an integer in [0, {limit})")
    if len(set(value)) != len(value):
        raise ScenarioError(f"{where} = {value!r}: repeated class id")
    return tuple(value)


def parse_scenario(data: object, source: str = "<scenario>") -> ScenarioTable:
    """Validate the JSON form of a scenario table; errors name the key, the value and the source."""
    if not isinstance(data, dict):
        raise ScenarioError(f"{source}: top level must be an object, got {type(data).__name__}")
    known = {"name", "source", "num_classes", "learnable_classes", "labeled_per_experience",
             "unlabeled_per_experience", "experiences"}  # fmt: skip
    unknown = sorted(set(data) - known)
    if unknown:
        raise ScenarioError(f"{source}: unknown key(s) {unknown} (known: {sorted(known)})")
    num_classes = _int_field(data, "num_classes", source, 1)
    learnable = _int_field(data, "learnable_classes", source, 1)
    if learnable > num_classes:
        raise ScenarioError(f"{source}: learnable_classes = {learnable} exceeds num_classes = {num_classes}")
    labeled_n = _int_field(data, "labeled_per_experience", source, 1)
    unlabeled_n = _int_field(data, "unlabeled_per_experience", source, 0)
    rows = data.get("experiences")
    if not isinstance(rows, list) or not rows:
        raise ScenarioError(f"{source}: 'experiences' must be a non-empty list, got {rows!r:.80}")
    experiences = []
    for t, row in enumerate(rows):
        where = f"{source}: experiences[{t}]"
        if not isinstance(row, dict) or set(row) != {"labeled_classes", "unlabeled_classes"}:
            raise ScenarioError(f"{where} = {row!r:.120}: expected keys labeled_classes and unlabeled_classes")
        labeled = _class_list(row["labeled_classes"], f"{where}.labeled_classes", learnable, allow_empty=False)
        unlabeled = _class_list(row["unlabeled_classes"], f"{where}.unlabeled_classes", num_classes,
                                allow_empty=unlabeled_n == 0)  # fmt: skip
        experiences.append(ExperienceSpec(labeled, unlabeled))
    name = data.get("name", Path(source).stem)
    if not isinstance(name, str):
        raise ScenarioError(f"{source}: 'name' = {name!r}: expected a string")
    return ScenarioTable(name, num_classes, learnable, labeled_n, unlabeled_n, tuple(experiences))


def load_scenario(path: str | Path) -> ScenarioTable:
    """Read and validate a scenario table (the JSON form of the CLVISION 2024 tables)."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"scenario table not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: not valid JSON: {e}") from None
    return parse_scenario(data, str(path))


def scenario_path(scenarios_dir: str | Path, number: int) -> Path:
    return Path(scenarios_dir) / f"clvision2024_s{number}.json"


# --------------------------------------------------------------------------- image folders


@dataclass(frozen=True)
class ClassInfo:
    index: int
    wnid: str  # folder name of the class
    role: str  # "learnable" or "distractor"
    name: str


def read_classes(path: str | Path) -> list[ClassInfo]:
    """Read ``classes.tsv``; indices must be 0..n-1 (in any row order)."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"classes.tsv not found: {path}")
    with path.open(newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or rows[0][:2] != ["index", "wnid"]:
        raise ScenarioError(f"{path}: first line must be the header 'index<TAB>wnid<TAB>role<TAB>name'")
    classes = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < 2 or not row[0].strip().isdigit() or not row[1].strip():
            raise ScenarioError(f"{path}:{line}: bad row {row!r}: expected an integer index and a wnid")
        role = row[2] if len(row) > 2 else "learnable"
        name = row[3] if len(row) > 3 else row[1]
        classes.append(ClassInfo(int(row[0]), row[1].strip(), role, name))
    classes.sort(key=lambda c: c.index)
    if [c.index for c in classes] != list(range(len(classes))):
        raise ScenarioError(f"{path}: class indices must be 0..{len(classes) - 1} without gaps or repeats")
    if len({c.wnid for c in classes}) != len(classes):
        raise ScenarioError(f"{path}: repeated wnid")
    return classes


def decode_image(data: bytes, image_size: int, what: str) -> np.ndarray:
    """Encoded bytes -> uint8 (S, S, 3) RGB."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ScenarioError(f"cannot decode image {what}")
    if image.shape[:2] != (image_size, image_size):
        shrink = image.shape[0] > image_size or image.shape[1] > image_size
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class ImageSplit:
    """One split (``train`` or ``val``) of an image folder: per-class image lists, decoded once and cached.

    Reads ``<root>/<split>/<wnid>/...`` or the members of ``<root>/<split>.tar``.
    Decoded images are kept per class in one uint8 array (count, S, S, 3), filled lazily.
    """

    def __init__(self, root: str | Path, split: str, classes: list[ClassInfo], image_size: int):
        self.root, self.split, self.classes, self.image_size = Path(root), split, classes, image_size
        by_wnid = {c.wnid: c.index for c in classes}
        self._files: dict[int, list] = {c.index: [] for c in classes}  # class -> [path or (offset, size, name)]
        tar_path, dir_path = self.root / f"{split}.tar", self.root / split
        self._tar_path: Path | None = None
        if dir_path.is_dir():
            for p in sorted(dir_path.rglob("*")):
                cls = self._class_of(p.relative_to(dir_path).parts[:-1], by_wnid)
                if cls is not None and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
                    self._files[cls].append(p)
        elif tar_path.is_file():
            self._tar_path = tar_path
            try:
                with tarfile.open(tar_path, "r:") as tar:
                    members = [m for m in tar.getmembers() if m.isfile()]
            except tarfile.TarError as e:
                raise ScenarioError(f"{tar_path}: not a readable uncompressed tar: {e}") from None
            for m in sorted(members, key=lambda m: m.name):
                parts = Path(m.name).parts
                parts = parts[1:] if parts and parts[0] == split else parts
                cls = self._class_of(parts[:-1], by_wnid)
                if cls is not None and Path(m.name).suffix.lower() in IMAGE_SUFFIXES:
                    self._files[cls].append((m.offset_data, m.size, m.name))
        else:
            raise ScenarioError(f"image folder {self.root} has neither {split}/ nor {split}.tar")
        self._cache: dict[int, np.ndarray] = {}
        self._decoded: dict[int, np.ndarray] = {}
        self._tar_file = None

    @staticmethod
    def _class_of(parts: tuple[str, ...], by_wnid: dict[str, int]) -> int | None:
        return next((by_wnid[p] for p in parts if p in by_wnid), None)

    def count(self, cls: int) -> int:
        return len(self._files[cls])

    def _read(self, entry) -> tuple[bytes, str]:
        if isinstance(entry, Path):
            return entry.read_bytes(), str(entry)
        offset, size, name = entry
        if self._tar_file is None:
            self._tar_file = open(self._tar_path, "rb")  # noqa: SIM115 - kept open for the split's lifetime
        self._tar_file.seek(offset)
        return self._tar_file.read(size), f"{self._tar_path}:{name}"

    def images(self, cls: int, indices: np.ndarray) -> np.ndarray:
        """Images ``indices`` of class ``cls`` as uint8 (k, S, S, 3); each file is decoded at most once."""
        n = self.count(cls)
        if n == 0:
            raise ScenarioError(f"{self.root}: class {cls} ({self.classes[cls].wnid}) has no {self.split} images")
        if cls not in self._cache:
            self._cache[cls] = np.empty((n, self.image_size, self.image_size, 3), np.uint8)
            self._decoded[cls] = np.zeros(n, bool)
        cache, decoded = self._cache[cls], self._decoded[cls]
        for i in np.unique(indices[~decoded[indices]]):
            data, what = self._read(self._files[cls][i])
            cache[i] = decode_image(data, self.image_size, what)
            decoded[i] = True
        return cache[indices]

    def close(self) -> None:
        if self._tar_file is not None:
            self._tar_file.close()
            self._tar_file = None


class ImageFolder:
    """``classes.tsv`` + ``train`` and ``val`` splits (directories or tars), at one image size."""

    def __init__(self, root: str | Path, image_size: int):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ScenarioError(f"image folder not found: {self.root}")
        self.classes = read_classes(self.root / "classes.tsv")
        self.image_size = image_size
        self._splits: dict[str, ImageSplit] = {}

    def split(self, name: str) -> ImageSplit:
        if name not in self._splits:
            self._splits[name] = ImageSplit(self.root, name, self.classes, self.image_size)
        return self._splits[name]

    def close(self) -> None:
        for s in self._splits.values():
            s.close()


# --------------------------------------------------------------------------- the stream


@dataclass
class StreamExperience:
    index: int
    labeled: np.ndarray  # uint8 (N, S, S, 3)
    labels: np.ndarray  # int64 (N,)
    unlabeled: np.ndarray  # uint8 (M, S, S, 3)
    spec: ExperienceSpec


def equal_split(total: int, classes: tuple[int, ...], rng: np.random.Generator) -> dict[int, int]:
    """``total`` images over ``classes``: equal shares, the remainder as +1 for randomly chosen classes."""
    if not classes:
        return {}
    share, rest = divmod(total, len(classes))
    extra = set(rng.choice(len(classes), size=rest, replace=False).tolist()) if rest else set()
    return {c: share + (i in extra) for i, c in enumerate(classes)}


class ClassPools:
    """Per-class draw orders over a split: without replacement until a class is used up, then a new order."""

    def __init__(self, split: ImageSplit, rng: np.random.Generator):
        self.split, self.rng = split, rng
        self._order: dict[int, np.ndarray] = {}
        self._cursor: dict[int, int] = {}
        self.reshuffles: dict[int, int] = {}  # class -> times its pool was exhausted and restarted

    def draw_indices(self, cls: int, k: int) -> np.ndarray:
        n = self.split.count(cls)
        if n == 0:
            raise ScenarioError(f"class {cls} ({self.split.classes[cls].wnid}) has no {self.split.split} images")
        taken = []
        while k > 0:
            if cls not in self._order or self._cursor[cls] >= n:
                if cls in self._order:
                    self.reshuffles[cls] = self.reshuffles.get(cls, 0) + 1
                self._order[cls], self._cursor[cls] = self.rng.permutation(n), 0
            start = self._cursor[cls]
            chunk = self._order[cls][start : start + k]
            self._cursor[cls] = start + len(chunk)
            taken.append(chunk)
            k -= len(chunk)
        return np.concatenate(taken) if taken else np.empty(0, np.int64)

    def draw(self, counts: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Images and class ids for ``{class: count}``, in class order."""
        size = self.split.image_size
        images, labels = [np.empty((0, size, size, 3), np.uint8)], [np.empty(0, np.int64)]
        for cls, k in counts.items():
            if k:
                images.append(self.split.images(cls, self.draw_indices(cls, k)))
                labels.append(np.full(k, cls, np.int64))
        return np.concatenate(images), np.concatenate(labels)


def check_folder_covers(table: ScenarioTable, folder: ImageFolder) -> None:
    if len(folder.classes) < table.num_classes:
        raise ScenarioError(
            f"scenario '{table.name}' uses {table.num_classes} classes but {folder.root}/classes.tsv "
            f"has only {len(folder.classes)}"
        )


def build_stream(
    table: ScenarioTable, folder: ImageFolder, seed: int, limit: int | None = None
) -> Iterator[StreamExperience]:
    """Yield the experiences of ``table`` in order (the first ``limit`` only, if given), built lazily.

    The draw for experience t depends only on the seed and experiences 0..t, so a
    shorter stream is a prefix of the longer one.
    """
    check_folder_covers(table, folder)
    rng = np.random.default_rng(seed)
    pools = ClassPools(folder.split("train"), rng)
    specs = table.experiences[:limit] if limit else table.experiences
    for t, spec in enumerate(specs):
        labeled, labels = pools.draw(equal_split(table.labeled_per_experience, spec.labeled_classes, rng))
        unlabeled, _ = pools.draw(equal_split(table.unlabeled_per_experience, spec.unlabeled_classes, rng))
        order = rng.permutation(len(labels))
        yield StreamExperience(t, labeled[order], labels[order], unlabeled[rng.permutation(len(unlabeled))], spec)


def val_set(table: ScenarioTable, folder: ImageFolder, per_class: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The val images of the learnable classes (the first ``per_class`` of each, if > 0): (X, y) sorted by class."""
    check_folder_covers(table, folder)
    split = folder.split("val")
    images, labels = [], []
    for cls in range(table.learnable_classes):
        n = split.count(cls) if per_class <= 0 else min(per_class, split.count(cls))
        images.append(split.images(cls, np.arange(n)))
        labels.append(np.full(n, cls, np.int64))
    return np.concatenate(images), np.concatenate(labels)
