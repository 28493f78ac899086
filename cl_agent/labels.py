"""The persisted label map: class names in class-id order.

Labels arrive as class names (strings) or integer class ids. A name not seen
before becomes the next class id, up to ``max_classes``; past it the whole
message is refused (nothing is added). An integer id is used as is (it must be
below ``max_classes``); ids beyond the known names get placeholder names
(their decimal string), so names and ids never point at different classes: an
id whose placeholder is already the name of another class is refused
(``bad_class_id``). The intake plans a message's ids first (``plan``, no
change) and saves its new names (``apply``) only once its record is in the
spool, before the ack: a refused message adds no class. labels.json is
written atomically, and the map in memory changes only after that write
succeeded.

Names are compared exactly: "Circle" and "circle" are two classes (they may be
distinct on purpose), but each takes one of the model's outputs for good, so a
new name equal to a known one but for letter case is logged as a warning once.

A fixed class set (``spool.classes``) closes the map: its names get ids in their
order, and any other name is refused (``bad_label``, naming the closest allowed
name). A labels.json that names a class otherwise is refused at start.
"""

from __future__ import annotations

import difflib
import json
import logging
import shlex
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from cl_agent.errors import BusyError, CLAgentError
from cl_agent.storage import atomic_write_text, lock_workdir
from cl_agent.wire import label_problem

log = logging.getLogger("cl_agent.labels")


def _limit_text(max_classes: int) -> str:
    return f"spool.max_classes is {max_classes} (0, the default, means model.num_classes)"


class LabelError(ValueError):
    """A label the map refuses; ``reason`` is a nack reason code."""

    def __init__(self, reason: str, detail: str):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class LabelPlan:
    """A message's class ids, and the whole name list to save first when it adds names (None if it adds none)."""

    ids: list[int]
    base: int  # how many names the map held when planned
    names: list[str] | None = None


class LabelMap:
    def __init__(self, path: str | Path, max_classes: int = 1000, classes: Sequence[str] = ()):
        """``max_classes`` 0 means no limit (the agent resolves spool.max_classes 0 to model.num_classes).

        ``classes`` (spool.classes), when given, is the fixed class set: the map holds those names, in
        that order, and refuses any other. A labels.json holding more names than ``max_classes``, or
        naming a class otherwise than ``classes``, is refused (CLAgentError, naming the fix)."""
        self.path = Path(path)
        self.max_classes = max_classes
        self.classes = tuple(classes)
        self._names: list[str] = []
        self._ids: dict[str, int] = {}
        self._folded: dict[str, str] = {}  # casefolded name -> the first name with that folding
        self._unsaved = False  # names of the fixed set not in labels.json yet: written with the first new sample
        self.stored = 0  # names read from labels.json (0 when missing): the fixed set fills the map without it
        if self.path.exists():
            data = json.loads(self.path.read_text())
            names = data.get("names") if isinstance(data, dict) else None
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"{self.path}: expected {{'names': [str, ...]}}")
            if max_classes and len(names) > max_classes:
                # An older working directory (made under a larger spool.max_classes): those names have no
                # model output. Their samples are refused from now on (ids_for), never acked and then dropped.
                log.warning(
                    "%s holds %d class names, more than spool.max_classes %d (0 means model.num_classes): "
                    "samples labeled %s have no model output and are refused (too_many_classes); to train them, "
                    "start with spool.max_classes and model.num_classes of at least %d in a new working directory",
                    self.path, len(names), max_classes, ", ".join(repr(n) for n in names[max_classes:][:10]), len(names),
                )
            for name in names:
                self._add(name)
            self.stored = len(names)
        if self.classes:
            self._check_fixed()
            for name in self.classes[len(self._names):]:
                self._add(name)
                self._unsaved = True

    def _check_fixed(self) -> None:
        """The held names must be the fixed set's first names, in its order."""
        for class_id, name in enumerate(self._names):
            if class_id >= len(self.classes):
                raise CLAgentError(
                    f"{self.path} holds {len(self._names)} class names, spool.classes only {len(self.classes)}: "
                    f"class {class_id} {name!r} is not in spool.classes. Add the missing names to the end of "
                    "spool.classes (`cl-agent labels list` prints the map), or start a new working directory"
                )
            if name != self.classes[class_id]:
                fix = (
                    f"rename it with `cl-agent labels rename {shlex.quote(name)} {shlex.quote(self.classes[class_id])}` (agent stopped) if "
                    "it is the same class, or list the names of labels.json first in spool.classes"
                    if self.classes[class_id] not in self._ids
                    else "list the names of labels.json first in spool.classes, in its order"
                )
                raise CLAgentError(
                    f"{self.path} names class {class_id} {name!r}, but spool.classes names it "
                    f"{self.classes[class_id]!r}: spool.classes gives ids in its order. Either {fix} "
                    "(`cl-agent labels list` prints the map); or start a new working directory"
                )

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
        """Class ids for a message's labels, saving new names; all or nothing: a refused label adds no class."""
        plan = self.plan(labels)
        self.apply(plan)
        return plan.ids

    def plan(self, labels: Sequence[str | int]) -> LabelPlan:
        """Class ids for a message's labels, without changing the map or the file (``apply`` does);
        LabelError if one is refused."""
        new_names: list[str] = []
        top_id = len(self._names) - 1
        planned: dict[str, int] = {}
        ids = []
        for label in labels:
            if isinstance(label, str):
                class_id = self._ids.get(label, planned.get(label))
                if class_id is not None and self.max_classes and class_id >= self.max_classes:
                    raise LabelError(
                        "too_many_classes",
                        f"class {label!r} has id {class_id} in labels.json, past {_limit_text(self.max_classes)}: "
                        "the model has no output for it",
                    )
                if class_id is None and self.classes:
                    raise LabelError("bad_label", self._not_in_fixed(label))
                if class_id is None:
                    class_id = len(self._names) + len(new_names)
                    if self.max_classes and class_id >= self.max_classes:
                        raise LabelError(
                            "too_many_classes",
                            f"new class {label!r} would get class id {class_id} (ids are 0-based), {_limit_text(self.max_classes)}",
                        )
                    planned[label] = class_id
                    new_names.append(label)
            else:
                class_id = int(label)
                if self.classes and not 0 <= class_id < len(self.classes):
                    raise LabelError(
                        "bad_class_id", f"class id {class_id} outside [0, {len(self.classes)}): spool.classes names {len(self.classes)} classes"
                    )
                if class_id < 0 or (self.max_classes and class_id >= self.max_classes):
                    raise LabelError("bad_class_id", f"class id {class_id} outside [0, {self.max_classes}): {_limit_text(self.max_classes)}")
                top_id = max(top_id, class_id)
            ids.append(class_id)
        if top_id >= len(self._names) + len(new_names):
            # Integer ids past the known classes: names interleaved with new string labels
            # would collide, so placeholders are assigned first and string labels re-planned.
            return self._plan_with_placeholders(labels, top_id)
        return LabelPlan(ids, len(self._names), [*self._names, *new_names] if new_names else None)

    def apply(self, plan: LabelPlan) -> None:
        """Save the names ``plan`` adds: labels.json first, then the map in memory, so an OSError (a full
        disk) leaves both as they were. Plans are applied in the order they were made, one at a time."""
        if plan.base != len(self._names):
            raise RuntimeError(f"label plan made for {plan.base} names applied to a map of {len(self._names)}")
        if plan.names is None:
            if self._unsaved:
                self.save()
            return
        warnings, folded = [], dict(self._folded)
        for class_id, name in enumerate(plan.names[plan.base:], plan.base):
            similar = folded.setdefault(name.casefold(), name)
            if similar != name:
                warnings.append((name, similar, class_id))
        self._replace(plan.names)  # the file first, then the map in memory
        for name, similar, class_id in warnings:
            self._warn_similar(name, similar, class_id)

    def _not_in_fixed(self, label: str) -> str:
        """The nack detail for a name outside the fixed class set: the closest allowed name, else all of them."""
        close = [n for n in self.classes if n.casefold() == label.casefold()]
        close = close or difflib.get_close_matches(label, self.classes, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else "allowed: " + ", ".join(repr(n) for n in self.classes[:20])
        if not close and len(self.classes) > 20:
            hint += f", ... ({len(self.classes)} in all)"
        return f"class name {label!r} is not in spool.classes (the fixed class set): {hint}"

    @staticmethod
    def _warn_similar(name: str, similar: str, class_id: int) -> None:
        """Logged once per new name, when it was saved."""
        log.warning(
            "new class %r differs from the known class %r only in letter case; it becomes a separate "
            "class (class %d) and takes one of the model's outputs for good",
            name, similar, class_id,
        )

    def _plan_with_placeholders(self, labels: Sequence[str | int], top_id: int) -> LabelPlan:
        names = list(self._names)
        for class_id in range(len(names), top_id + 1):
            clash = self._ids.get(str(class_id))
            if clash is not None:
                raise LabelError(
                    "bad_class_id",
                    f"class id {top_id} would give ids {len(names)}..{top_id} placeholder names (their ids), but "
                    f"{str(class_id)!r}, the placeholder of id {class_id}, already names class {clash}: name and id would "
                    f"point at different classes. Send class names (this map holds {len(names)})",
                )
        names += [str(i) for i in range(len(names), top_id + 1)]
        known = set(names)
        new = [lab for lab in dict.fromkeys(labels) if isinstance(lab, str) and lab not in known]
        if self.max_classes and len(names) + len(new) > self.max_classes:
            raise LabelError("too_many_classes", f"{len(names) + len(new)} classes needed, {_limit_text(self.max_classes)}")
        names += new
        index: dict[str, int] = {}
        for class_id, name in enumerate(names):
            index.setdefault(name, class_id)
        return LabelPlan([index[lab] if isinstance(lab, str) else int(lab) for lab in labels], len(self._names), names)

    def _replace(self, names: Sequence[str]) -> None:
        """The whole map, as rebuilt by ``restore_labels``; saved (the file first, then memory)."""
        atomic_write_text(self.path, json.dumps({"names": list(names)}, indent=0))
        self._names, self._ids, self._folded, self._unsaved = [], {}, {}, False
        for name in names:
            self._add(name)

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps({"names": self._names}, indent=0))
        self._unsaved = False


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


@contextmanager
def workdir_lock(workdir: str | Path) -> Iterator[None]:
    """Hold the working directory's agent lock (the one a running agent holds) for an offline change;
    BusyError (exit code 75) if an agent runs there now."""
    try:
        lock_file = lock_workdir(workdir)
    except BusyError as e:
        raise BusyError(f"{e}: stop it first") from None
    try:
        yield
    finally:
        lock_file.close()


def read_label_map(path: str | Path) -> LabelMap:
    """``path``'s map, without a class limit, for an offline command; CLAgentError naming the file if damaged."""
    try:
        return LabelMap(path, 0)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CLAgentError(f"cannot read the class names {path}: {e}") from None


def rename_label(workdir: str | Path, old: str, new: str, classes: Sequence[str] = ()) -> int:
    """Rename class ``old`` to ``new`` in ``workdir/labels.json``, keeping its id; the id.

    Only while no agent runs there (the caller holds ``workdir_lock``): a running agent keeps the map in
    memory and would write the old name back. The published versions keep the names they were
    published with; the next one carries the new name. ``classes`` (the agent's spool.classes, when the
    caller read its config) must name that id ``new`` already: else the agent would refuse to start."""
    path = Path(workdir) / "labels.json"
    if not path.exists():
        raise CLAgentError(f"{path} does not exist: no class to rename")
    labels = read_label_map(path)
    names = labels.names
    problem = label_problem(new)
    if problem:
        raise CLAgentError(f"new name: a class name {problem}")
    if old not in names:
        close = difflib.get_close_matches(old, names, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise CLAgentError(f"{path} has no class {old!r}{hint}: `cl-agent labels list` prints its names")
    if new in names:
        raise CLAgentError(
            f"{path} already has a class {new!r} (class {names.index(new)}): two ids cannot share a name, "
            "and the samples stored under each id stay theirs"
        )
    class_id = names.index(old)
    if classes and (class_id >= len(classes) or classes[class_id] != new):
        fixed = f"names class {class_id} {classes[class_id]!r}" if class_id < len(classes) else f"names only {len(classes)} classes"
        raise CLAgentError(
            f"spool.classes of the config {fixed}: after renaming class {class_id} {old!r} to {new!r} the agent "
            f"would refuse to start (labels.json and spool.classes must name each id alike). Change spool.classes "
            f"in the config too (class {class_id}: {new!r}) and rename with the config after that change"
        )
    names[class_id] = new
    labels._replace(names)
    return class_id


def class_usage(workdir: str | Path) -> dict[int, dict]:
    """Per class id: the cut experiences holding its samples (``experiences``), those trained (``trained``),
    and whether the open spool segment holds some (``open``). Read from the experiences' meta files and
    the open segment."""
    from cl_agent.experience import ExperienceStore
    from cl_agent.spool import read_records, segment_name

    store = ExperienceStore(workdir)
    cut = store.indices()
    usage: dict[int, dict] = {}

    def entry(class_id: int) -> dict:
        return usage.setdefault(int(class_id), {"experiences": [], "trained": [], "open": False})

    for index in cut:
        trained = store.is_trained(index)
        for class_id in store.meta(index).get("classes") or ():
            entry(class_id)["experiences"].append(index)
            if trained:
                entry(class_id)["trained"].append(index)
    open_segment = Path(workdir) / "spool" / segment_name(cut[-1] + 1 if cut else 0)
    if open_segment.exists():
        for _, record in read_records(open_segment):
            for class_id in record.labels:
                entry(class_id)["open"] = True
    return usage
