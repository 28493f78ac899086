"""The persisted label map: class names in class-id order.

Labels arrive as class names (strings) or integer class ids. A name not seen
before becomes the next class id, up to ``max_classes``; past it the whole
message is refused (nothing is added). An integer id is used as is (it must be
below ``max_classes``); ids beyond the known names get placeholder names
(their decimal string), so names and ids never point at different classes.
The map is written atomically before any sample using a new class is acked.

Names are compared exactly: "Circle" and "circle" are two classes (they may be
distinct on purpose), but each takes one of the model's outputs for good, so a
new name equal to a known one but for letter case is logged as a warning once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from cl_agent.errors import CLAgentError
from cl_agent.storage import atomic_write_text

log = logging.getLogger("cl_agent.labels")


def _limit_text(max_classes: int) -> str:
    return f"spool.max_classes is {max_classes} (0, the default, means model.num_classes)"


class LabelError(ValueError):
    """A label the map refuses; ``reason`` is a nack reason code."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


class LabelMap:
    def __init__(self, path: str | Path, max_classes: int = 1000):
        """``max_classes`` 0 means no limit (the agent resolves spool.max_classes 0 to model.num_classes)."""
        self.path = Path(path)
        self.max_classes = max_classes
        self._names: list[str] = []
        self._ids: dict[str, int] = {}
        self._folded: dict[str, str] = {}  # casefolded name -> the first name with that folding
        if self.path.exists():
            data = json.loads(self.path.read_text())
            names = data.get("names") if isinstance(data, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{self.path}: expected {{'names': [str, ...]}}")
            for name in names:
                self._add(name)

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def _add(self, name: str) -> int:
        self._ids.setdefault(name, len(self._names))
        self._folded.setdefault(name.casefold(), name)
        self._names.append(name)
        return len(self._names) - 1

    def id_for(self, label: str | int) -> int:
        """The class id of one label, adding (and saving) a new class if needed."""
        return self.ids_for([label])[0]

    def ids_for(self, labels: Sequence[str | int]) -> list[int]:
        """Class ids for a message's labels; all or nothing: a refused label adds no class."""
        new_names: list[str] = []
        top_id = len(self._names) - 1
        planned: dict[str, int] = {}
        ids = []
        for label in labels:
            if isinstance(label, str):
                class_id = self._ids.get(label, planned.get(label))
                if class_id is None:
                    class_id = len(self._names) + len(new_names)
                    if self.max_classes and class_id >= self.max_classes:
                        raise LabelError(
                            "too_many_classes", f"new class {label!r} would be class {class_id + 1}, {_limit_text(self.max_classes)}"
                        )
                    planned[label] = class_id
                    new_names.append(label)
            else:
                class_id = int(label)
                if class_id < 0 or (self.max_classes and class_id >= self.max_classes):
                    raise LabelError("bad_class_id", f"class id {class_id} outside [0, {self.max_classes}): {_limit_text(self.max_classes)}")
                top_id = max(top_id, class_id)
            ids.append(class_id)
        if top_id >= len(self._names) + len(new_names):
            # Integer ids past the known classes: names interleaved with new string labels
            # would collide, so placeholders are assigned first and string labels re-planned.
            return self._ids_with_placeholders(labels, top_id)
        if new_names:
            for name in new_names:
                self._warn_if_similar(name)
                self._add(name)
            self.save()
        return ids

    def _warn_if_similar(self, name: str) -> None:
        """Called once per new name, before it is added."""
        similar = self._folded.get(name.casefold())
        if similar is not None:
            log.warning(
                "new class %r differs from the known class %r only in letter case; it becomes a separate "
                "class (class %d) and takes one of the model's outputs for good",
                name, similar, len(self._names),
            )

    def _ids_with_placeholders(self, labels: Sequence[str | int], top_id: int) -> list[int]:
        names = list(self._names)
        names += [str(i) for i in range(len(names), top_id + 1)]
        trial = LabelMap.__new__(LabelMap)
        trial.path, trial.max_classes, trial._names, trial._ids, trial._folded = self.path, self.max_classes, [], {}, {}
        for name in names:
            trial._add(name)
        new = [lab for lab in dict.fromkeys(labels) if isinstance(lab, str) and lab not in trial._ids]
        if self.max_classes and len(names) + len(new) > self.max_classes:
            raise LabelError("too_many_classes", f"{len(names) + len(new)} classes needed, {_limit_text(self.max_classes)}")
        for name in new:
            trial._warn_if_similar(name)
            trial._add(name)
        self._names, self._ids, self._folded = trial._names, trial._ids, trial._folded
        self.save()
        return [self._ids[lab] if isinstance(lab, str) else int(lab) for lab in labels]

    def _replace(self, names: Sequence[str]) -> None:
        """The whole map, as rebuilt by ``restore_labels``; saved."""
        self._names, self._ids, self._folded = [], {}, {}
        for name in names:
            self._add(name)
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"names": self._names}, indent=0))


def names_from_manifest(class_names: Sequence[str]) -> list[str]:
    """A published version's ``class_names`` (one per model output) as a label map: the trailing
    outputs no class was given yet carry their index as a placeholder name and are left out, so
    new class names take them again."""
    names = list(class_names)
    while names and names[-1] == str(len(names) - 1):
        names.pop()
    return names


def restore_labels(workdir: str | Path, class_names: Sequence[str], highest_stored_id: int, source: str) -> list[str]:
    """Write ``workdir/labels.json`` from a published version's ``class_names``; the notes to print.

    Refuses to replace a map that holds names. Classes stored in experiences above the names
    the version knows (added after it was published) get placeholder names (their ids), and a
    note says so: their real names only a backup has.
    """
    path = Path(workdir) / "labels.json"
    if path.exists():
        try:
            held = LabelMap(path, 0).names
        except (OSError, UnicodeDecodeError, ValueError):
            held = []  # damaged: replacing it is what the restore is for
        if held:
            raise CLAgentError(f"{path} already holds {len(held)} class names; move it away first to rebuild it")
    names = names_from_manifest(class_names)
    notes = [f"{len(names)} class names from {source}"]
    if highest_stored_id >= len(names):
        notes.append(
            f"the stored experiences use class ids up to {highest_stored_id}, past the {len(names)} names of {source}: "
            f"ids {len(names)}..{highest_stored_id} were added after it was published and are named by their ids now "
            f"(rename them in {path.name} from a backup or your records if you know them)"
        )
        names += [str(i) for i in range(len(names), highest_stored_id + 1)]
    LabelMap(path, 0)._replace(names)
    return notes


def highest_stored_class_id(workdir: str | Path) -> int:
    """The highest class id in the cut experiences and the open spool segment; -1 if none."""
    from cl_agent.experience import ExperienceStore
    from cl_agent.spool import read_records, segment_name

    store = ExperienceStore(workdir)
    cut = store.indices()
    highest = max((max(store.meta(i).get("classes") or [-1]) for i in cut), default=-1)
    open_segment = Path(workdir) / "spool" / segment_name(cut[-1] + 1 if cut else 0)
    if open_segment.exists():
        for _, record in read_records(open_segment):
            highest = max(highest, *record.labels, -1)
    return highest
