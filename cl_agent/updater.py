"""The update loop: durable experiences in, trained + exported + published models out.

One update, in this order (each step durable before the next):

1. take the pending experiences (cut, durable, not trained) in order; with the
   ``merge`` backlog policy, all of them become one update;
2. predict their labeled samples with the current model (online accuracy:
   data the model has not trained on yet);
3. train; 4. checkpoint atomically as ``checkpoints/exp-<last>.pt``;
5. export to ONNX + parity check, publish a version, announce it;
6. mark the experiences trained; append the record to ``experiences.jsonl``.

INVARIANT: the newest checkpoint's name is the last experience trained into it.
On restart, experiences at or below it are never trained again (marked if a
crash came before step 6, exported again if before step 5); experiences above
it are trained from that checkpoint, so an interrupted update is redone and no
sample is learned twice as new data.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from cl_agent.errors import CLAgentError
from cl_agent.config import AgentConfig
from cl_agent.device import resolve_device
from cl_agent.experience import ExperienceStore, UnreadableExperience
from cl_agent.export import ExportError
from cl_agent.labels import LabelMap, names_from_manifest
from cl_agent.repository import (
    OPTIMIZED_FILE, Announcer, ModelRepository, OptimizedModel, PublishingHeld, PublishingHold, release_hint,
)
from cl_agent.session import runtime_environment
from cl_agent.status import (
    CHECKING_PARITY,
    CHECKPOINTING,
    EXPORTING,
    PUBLISHING,
    TRAINING,
    append_experience_record,
    now_iso,
    recorded_since,
    records_backwards,
)
from cl_agent.storage import atomic_write_text

log = logging.getLogger("cl_agent.updater")

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_RE = re.compile(r"^exp-([0-9]{6,})\.pt$")  # zero-padded to 6 digits, more past experience 999999
KEEP_CHECKPOINTS = 2
EXPORT_TEMP_PREFIX = "export-"  # temp folders of an export in progress (removed on start if a crash left one)
AGENT_ID_FILE = "agent-id"  # names this working directory in the manifests of the versions it publishes


def agent_id(workdir: Path) -> str:
    """The identity of the agent of ``workdir``: made once, then read (it moves with the folder)."""
    import uuid

    path = workdir / AGENT_ID_FILE
    try:
        found = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        found = ""
    if not found:
        found = uuid.uuid4().hex
        atomic_write_text(path, found + "\n")
    return found


def newest_trained(workdir: Path) -> tuple[int | None, int | None]:
    """(the newest experience an update trained, the newest version published) from ``experiences.jsonl``."""
    trained = version = None
    for record in records_backwards(workdir):
        if version is None and isinstance(record.get("version"), int):
            version = record["version"]
        if trained is None and not record.get("skipped"):
            trained = max(record.get("merged") or [record.get("experience", -1)])
        if trained is not None and version is not None:
            break
    return trained, version


class UpdateInterrupted(Exception):
    """Raised inside an update when the agent is asked to stop; the update is redone on restart."""


class TrainerSetupError(CLAgentError):
    """The trainer cannot start with this configuration (unknown backbone, no CUDA, a checkpoint of
    another model): restarting it would fail the same way."""


def newest_manifest(repository: ModelRepository) -> tuple[int, dict] | None:
    """The newest version and its manifest, for the start checks; None when there is none or it is damaged
    (the servers skip a damaged version, and so do the checks)."""
    latest = repository.latest_version()
    if latest is None:
        return None
    try:
        return latest, repository.load_manifest(latest)
    except CLAgentError:
        return None


def check_repository_owner(cfg: AgentConfig, own_id: str, latest: int, manifest: dict) -> None:
    """Refuse a model name whose newest version another agent published: each would replace the other's
    versions on every server (with a model of other classes, sizes or training, say)."""
    owner = manifest.get("agent_id")
    if owner is not None and owner != own_id:
        raise CLAgentError(
            f"model {cfg.agent.model_name!r} in {cfg.repository.root} was published by another agent "
            f"(version {latest}: agent id {owner}; this working directory's is {own_id}, in "
            f"{Path(cfg.agent.workdir) / AGENT_ID_FILE}). Two agents publishing one model would replace each other's versions "
            "on every server: give this agent its own agent.model_name or repository.root; or, if this working "
            f"directory takes over from that agent on purpose, copy that agent's {AGENT_ID_FILE} file here"
        )


def check_labels_cover_published(
    workdir: Path, own_id: str, latest: int, manifest: dict, classes: Sequence[str] = ()
) -> str | None:
    """Refuse a labels.json holding fewer class names than the newest version was published with (an older
    copy put back): new class names would take the ids, and outputs, of classes the model already learned.
    Refuse one placing a published class name at another id (names put back in another order, or
    ``classes``, spool.classes, standing in for a lost labels.json): the model learned that class at its
    published output. Returns a warning when it names published classes differently (a rename: allowed),
    else None."""
    if manifest.get("agent_id") not in (None, own_id):
        return None
    published = names_from_manifest(manifest.get("class_names") or [])
    path = workdir / "labels.json"
    try:
        held = LabelMap(path, 0).names
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # the ingest process refuses a damaged map, naming the file
    source, lost = str(path), False
    if not held and classes:
        held, source, lost = list(classes), f"spool.classes (standing in for the missing or empty {path})", True
    elif len(held) < len(classes) and held == list(classes[: len(held)]):
        held = list(classes)  # the fixed set extends labels.json with its next names
    if not held:
        return None  # lost with samples stored: the ingest process refuses it; else a new start (one taking over, say)
    if len(held) < len(published) and lost:
        raise CLAgentError(
            f"{source} names {len(held)} classes, but version {latest} was published with {len(published)} "
            f"(its class {len(held)} is {published[len(held)]!r}): new class names would take the ids of classes "
            f"the model already learned. Restore {path.name} from a backup, or rebuild it with `cl-agent labels restore`"
        )
    if len(held) < len(published):
        raise CLAgentError(
            f"{path} holds {len(held)} class names, but version {latest} was published with {len(published)} "
            f"(its class {len(held)} is {published[len(held)]!r}): it is an older copy, and starting would give "
            "new class names the ids of classes the model already learned. Restore the newest labels.json from a "
            "backup; or move it away and rebuild it with `cl-agent labels restore`"
        )
    published_id = {name: i for i, name in reversed(list(enumerate(published)))}
    moved = [(name, published_id[name], i) for i, name in enumerate(held) if published_id.get(name, i) != i]
    if moved:
        name, was, now = moved[0]
        before = f"; its class {now} was {published[now]!r}" if now < len(published) else ""
        listed = ", ".join(f"{n!r} (published class {w}, here {h})" for n, w, h in moved[:10])
        more = f", ... ({len(moved)} in all)" if len(moved) > 10 else ""
        raise CLAgentError(
            f"{source} names class {now} {name!r}, but version {latest} was published with {name!r} as class "
            f"{was}{before}. Classes at other ids than published: {listed}{more}. Starting would train and serve "
            "them at outputs the model learned other classes at. "
            + (
                f"Restore {path.name} from a backup, or rebuild it with `cl-agent labels restore`; and list "
                "spool.classes in the published order (`cl-agent models show` prints class_names in output order)"
                if lost else
                f"Put the names of {path.name} back in the published order (restore it from a backup, or move it "
                "away and rebuild it with `cl-agent labels restore`; `cl-agent models show` prints class_names in "
                "output order); to give a class another name, `cl-agent labels rename OLD NEW` keeps its id"
            )
        )
    renamed = [i for i, name in enumerate(published) if held[i] != name]
    if not renamed:
        return None
    i = renamed[0]
    return (
        f"{source} names class {i} {held[i]!r}, version {latest} {published[i]!r} ({len(renamed)} classes named "
        f"differently): the served names follow {path.name} from the next version on"
    )


def checkpoints_in(checkpoint_dir: Path) -> list[tuple[int, Path]]:
    """The trainer checkpoints in ``checkpoint_dir`` as (last experience trained into it, path), oldest first
    (by number: ``exp-1000000.pt`` comes after ``exp-999999.pt``)."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def check_checkpoints_cover(cfg: AgentConfig, trained_through: int | None, newest: int | None) -> str | None:
    """Refuse to start from an older model than the records say was trained (a checkpoint deleted by
    hand): it would be published as the next version, and what it lacks would never be trained again.
    Returns the warning when ``agent.accept_lost_checkpoints`` lets it go on, else None."""
    if trained_through is None or (newest is not None and newest >= trained_through):
        return None
    workdir = Path(cfg.agent.workdir)
    have = f"the newest checkpoint is of experience {newest}" if newest is not None else "there is no checkpoint"
    start = f"the checkpoint of experience {newest}" if newest is not None else "an untrained model"
    problem = (
        f"experiences up to {trained_through} were trained ({workdir / 'experiences.jsonl'}), but {have} "
        f"in {workdir / CHECKPOINT_DIR}: the model that learned them is missing"
    )
    if cfg.agent.accept_lost_checkpoints:
        return f"{problem}; going on from {start} (agent.accept_lost_checkpoints)"
    raise CLAgentError(
        f"{problem}. Restore {CHECKPOINT_DIR}/exp-{trained_through:06d}.pt from a backup; or, to go on from "
        f"{start} anyway (what came after it is not trained again), start once with "
        "--set agent.accept_lost_checkpoints=true"
    )


def check_start(cfg: AgentConfig) -> list[str]:
    """The trainer's start checks of the configuration, the working directory and the repository, run
    without building the trainer: the backbone exists and runs on model.image_size images (on the meta
    device); the model repository is not another agent's;
    labels.json covers the published classes; the newest checkpoint is there and was trained with this
    model section. Raises CLAgentError naming the problem; returns the warnings to log.

    The device (``resolve_device``) is checked beside it. The agent runs both before it opens ingestion,
    so it never acks a sample that the trainer would then refuse to start for; the trainer runs them again
    as it starts (``Updater``). Writes nothing but this working directory's agent id (made once)."""
    from cl_agent.student import student_problem
    from cl_agent.trainer import check_checkpoint_model

    problem = student_problem(cfg.model)
    if problem:
        raise CLAgentError(problem)
    workdir = Path(cfg.agent.workdir)
    warnings = []
    latest = newest_manifest(ModelRepository(cfg.repository.root, cfg.agent.model_name))
    if latest is not None:
        own_id = agent_id(workdir)
        check_repository_owner(cfg, own_id, *latest)
        warnings.append(check_labels_cover_published(workdir, own_id, *latest, cfg.spool.classes))
    trained_through, _ = newest_trained(workdir)
    checkpoints = checkpoints_in(workdir / CHECKPOINT_DIR)
    warnings.append(check_checkpoints_cover(cfg, trained_through, checkpoints[-1][0] if checkpoints else None))
    if checkpoints:
        check_checkpoint_model(checkpoints[-1][1], cfg.model)
    return [w for w in warnings if w is not None]


def online_accuracy(logits: torch.Tensor, labels: np.ndarray, class_names: list[str]) -> dict:
    """Accuracy of predictions made before training, overall and per class name."""
    predicted = logits.argmax(dim=1).numpy()
    correct = predicted == labels
    per_class = {}
    for class_id in np.unique(labels):
        mask = labels == class_id
        name = class_names[class_id] if class_id < len(class_names) else str(class_id)
        per_class[name] = float(correct[mask].mean())
    return {
        "online_accuracy": float(correct.mean()) if len(labels) else None,
        "online_correct": int(correct.sum()),
        "online_total": int(len(labels)),
        "online_accuracy_per_class": per_class,
    }


def loss_terms(values: dict) -> dict[str, float]:
    """The loss terms of a trainer metrics or progress dict, named without the ``loss_`` prefix."""
    terms = {}
    for key, value in values.items():
        if key in ("loss", "total"):
            terms["total"] = float(value)
        elif key.startswith("loss_"):
            terms[key.removeprefix("loss_")] = float(value)
    return terms


@dataclass
class Publication:
    """What became of publishing one update's model: a version, an error, or an operator's hold."""

    version: int | None = None
    error: str | None = None  # the export was refused or a file could not be written
    hold: PublishingHold | None = None  # publishing is held (``cl-agent models hold``): nothing exported


@dataclass
class UpdateResult:
    experiences: list[int]
    version: int | None
    record: dict


class Updater:
    """Owns the trainer, the checkpoints and publishing for one working directory."""

    def __init__(self, cfg: AgentConfig, device: torch.device | str = "cpu"):
        from cl_agent.trainer import Trainer

        self.cfg = cfg
        self.workdir = Path(cfg.agent.workdir)
        for warning in check_start(cfg):  # before building anything: a refusal names the problem at once
            log.warning("%s", warning)
        self.device = torch.device(device)
        self.store = ExperienceStore(self.workdir)
        self.repository = ModelRepository(
            cfg.repository.root, cfg.agent.model_name, keep_last=cfg.repository.keep_last, pause_s=cfg.repository.publish_pause_us / 1e6
        )
        self.trainer = Trainer(cfg.model, cfg.train, device=self.device, seed=cfg.agent.seed)
        self.checkpoint_dir = self.workdir / CHECKPOINT_DIR
        self.last_trained = -1
        self.agent_id = agent_id(self.workdir)
        _, self.last_version = newest_trained(self.workdir)
        self.announcer = self._open_announcer()
        self.recovered: UpdateResult | None = None  # an update that a crash cut short and _restore completed
        self.republished: UpdateResult | None = None  # a recorded checkpoint that _restore published at start
        self.held: int | None = None  # the newest checkpoint's experience while a hold kept it from being published
        self._restore()

    def _open_announcer(self) -> Announcer | None:
        """The PUB socket for version announcements; None when announcing is off (empty endpoint) or the bind fails."""
        if not self.cfg.repository.announce_endpoint:
            return None  # announcing is off by configuration: servers poll the repository, nothing to warn about
        # Long-lived: a PUB socket bound just before sending loses the message (subscribers join late).
        try:
            return Announcer(self.cfg.repository.announce_endpoint)
        except Exception as error:  # noqa: BLE001 - servers also poll the repository
            log.warning("cannot bind %s for announcements (servers will poll): %s", self.cfg.repository.announce_endpoint, error)
            return None

    def close(self) -> None:
        if self.announcer is not None:
            self.announcer.close()
            self.announcer = None

    # ------------------------------------------------------------------ state

    def _checkpoints(self) -> list[tuple[int, Path]]:
        return checkpoints_in(self.checkpoint_dir)

    def _published_through(self) -> int | None:
        """The highest experience index a retained version was exported from.

        Not just the latest version's: a rollback republishes an older model with its older
        index, and a restart must not take that for an unpublished checkpoint and publish over it.
        """
        indices = []
        for version in self.repository.versions():
            try:
                index = self.repository.load_manifest(version).get("experience_index")
            except CLAgentError as e:
                log.warning("version %d: %s (ignored when looking for what was published)", version, e)
                continue
            if isinstance(index, int) and not isinstance(index, bool):
                indices.append(index)
        return max(indices, default=None)

    def _restore(self) -> None:
        """Load the newest checkpoint (``check_start`` accepted it), publish it if it never was, mark what it trained."""
        for stale in self.workdir.glob(f"{EXPORT_TEMP_PREFIX}*"):  # left by an export that a crash interrupted
            shutil.rmtree(stale, ignore_errors=True)
        checkpoints = self._checkpoints()
        if not checkpoints:
            return
        self.last_trained, path = checkpoints[-1]
        self.trainer.load_checkpoint(path)
        log.info("restored checkpoint %s (experiences up to %d trained)", path.name, self.last_trained)
        version = self.repository.latest_version()
        published = self._published_through()
        republished = None
        if published is None or published < self.last_trained:
            log.info("checkpoint of experience %d was never published: exporting it now", self.last_trained)
            republished = self._publish_checkpoint(metrics={"recovered": True})
            version = republished.version or version  # as in run_once: a failure keeps the served version and goes on learning
        recovered = [i for i in self.store.pending() if i <= self.last_trained]
        unrecorded = bool(recovered) and not set(recovered) <= recorded_since(self.workdir, min(recovered))
        if republished is not None and republished.version is not None and not unrecorded:
            # trained and recorded before (held, or its export failed): say that it is published now
            self.republished = self._record_publication(republished.version, 0.0, "restart")
        if unrecorded:
            # trained and checkpointed before a crash, but never recorded: record it (its online accuracy is lost)
            record = self._record(recovered, len(recovered), {}, None, None, 0.0, 0.0, version)
            metas = [self.store.meta(i) for i in recovered]  # the counts, without reading the images
            record.update(labeled=sum(m["labeled_samples"] for m in metas), unlabeled=sum(m["unlabeled_samples"] for m in metas))
            append_experience_record(self.workdir, record)
            self.recovered = UpdateResult(recovered, version, record)
        for index in recovered:
            self.store.mark_trained(index)

    def _publish_checkpoint(self, metrics: dict) -> Publication:
        """Export and publish the newest checkpoint (the trainer holds it), outside an update; keeps ``held``."""
        published = self._try_publish(self.last_trained, metrics=metrics)
        self.held = self.last_trained if published.hold is not None else None
        return published

    def _record_publication(self, version: int, export_seconds: float, when: str) -> UpdateResult:
        """Append the record of a checkpoint trained and recorded earlier (held, or its export failed) and
        published now, outside an update: it trains nothing (``merged`` empty), it carries the version."""
        record = self._record([self.last_trained], 0, {}, None, None, 0.0, export_seconds, version)
        record.update(merged=[], recovered=False, republished=when)
        record.pop("backlog")
        append_experience_record(self.workdir, record)
        log.info("checkpoint of experience %d published as version %d (%s)", self.last_trained, version, record["republished"])
        return UpdateResult([], version, record)

    def publish_released(self) -> UpdateResult | None:
        """Publish the newest checkpoint once the hold that kept it unpublished is lifted (``cl-agent models
        release``), without waiting for the next update; None while it is held, or when nothing waits.

        One stat while a held checkpoint waits, nothing otherwise: the update loop calls it when idle.
        A failed export is logged and not tried again here: the next update (or a restart) exports again."""
        if self.held is None or self.held != self.last_trained or self.repository.publishing_hold() is not None:
            return None
        log.info("publishing released: exporting the checkpoint of experience %d now", self.last_trained)
        started = time.monotonic()
        published = self._publish_checkpoint(metrics={"released": True})
        if published.version is None:
            return None
        return self._record_publication(published.version, time.monotonic() - started, "hold released")

    def class_names(self) -> list[str]:
        names = LabelMap(self.workdir / "labels.json", self.cfg.spool.max_classes).names
        size = self.cfg.model.num_classes
        return [names[i] if i < len(names) else str(i) for i in range(size)]

    def pending(self) -> list[int]:
        return [i for i in self.store.pending() if i > self.last_trained]

    # ------------------------------------------------------------------ one update

    def run_once(self, should_stop: callable = lambda: False, progress: callable | None = None) -> UpdateResult | None:
        """Train on what is pending (one update); None if nothing is pending.

        ``progress`` gets {"experience", "phase", "step", "steps"} messages (``cl_agent.status.PHASES``):
        one per finished training step (with its "losses"), then one as each later phase begins
        (checkpoint, export, parity check, publish), with the steps training did.
        """
        pending = self.pending()
        if not pending:
            return None
        policy = self.cfg.agent.backlog_policy
        chosen = pending if policy == "merge" else pending[:1]
        budget = self.cfg.train.time_budget_s or None
        if policy == "shorten" and budget and len(pending) > 1:
            budget = budget / len(pending)

        try:
            labeled, labels, unlabeled = self._load(chosen)
        except UnreadableExperience as e:
            # Its spool segment or draw is lost or damaged: it would fail the same way after every restart.
            # Only it is skipped (logged as an error naming the file); the others chosen with it are trained next.
            return self._skip([e.index], len(pending), str(e), level=logging.ERROR)
        known = labels < self.cfg.model.num_classes  # spool.max_classes may allow more names than the model has outputs
        if not known.all():
            log.warning("experiences %s: %d labeled samples have a class id >= model.num_classes (%d); left out",
                        chosen, int((~known).sum()), self.cfg.model.num_classes)
            labeled, labels = labeled[known], labels[known]
        if len(labeled) < 2:  # undecodable or too few samples: never let one experience stop the trainer for good
            return self._skip(chosen, len(pending), f"{len(labeled)} usable labeled images, an update needs 2")
        names = self.class_names()
        before = online_accuracy(self.trainer.predict(torch.from_numpy(labeled)), labels, names)

        def on_progress(info: dict) -> None:
            if should_stop():
                raise UpdateInterrupted()
            if progress is not None:
                progress({"experience": chosen[-1], "phase": TRAINING, "step": info.get("step"), "steps": info.get("steps"),
                          "losses": loss_terms(info)})

        from cl_agent.trainer import TrainingDivergedError

        started = time.monotonic()
        try:
            metrics = self.trainer.train_experience(
                torch.from_numpy(labeled),
                torch.from_numpy(labels),
                torch.from_numpy(unlabeled),
                time_budget_s=budget,
                progress=on_progress,
            )
        except TrainingDivergedError as e:
            # The same data and settings diverge the same way after a restart: undo this update's
            # steps (back to the last checkpoint) and skip it, rather than fail on it for ever.
            self._reset_trainer()
            return self._skip(chosen, len(pending), f"training diverged: {e}")
        update_seconds = time.monotonic() - started

        def on_phase(phase: str) -> None:  # the steps training did: fewer than planned when the time budget ended it
            if progress is not None:
                progress({"experience": chosen[-1], "phase": phase, "step": metrics.get("steps"), "steps": metrics.get("planned_steps")})

        on_phase(CHECKPOINTING)
        self._checkpoint(chosen[-1])

        started = time.monotonic()
        published = self._try_publish(chosen[-1], metrics=_jsonable(metrics), real_images=labeled, on_phase=on_phase)
        version = published.version
        export_seconds = time.monotonic() - started
        # the record goes before the marks: a crash between them leaves a recorded, unmarked experience,
        # which _restore marks without recording it again
        record = self._record(chosen, len(pending), before, metrics, (labels, unlabeled), update_seconds, export_seconds, version)
        if published.error is not None:
            record["publish_error"] = published.error
        if published.hold is not None:
            record["held"] = True  # trained and checkpointed; "version" is null
        self.held = chosen[-1] if published.hold is not None else None  # publish_released() publishes it on release
        append_experience_record(self.workdir, record)
        for index in chosen:
            self.store.mark_trained(index)
        return UpdateResult(chosen, version, record)

    def _reset_trainer(self) -> None:
        """A trainer as a restart would build it: the last checkpoint, or untrained if there is none."""
        from cl_agent.trainer import Trainer

        self.trainer = Trainer(self.cfg.model, self.cfg.train, device=self.device, seed=self.cfg.agent.seed)
        checkpoints = self._checkpoints()
        if checkpoints:
            self.trainer.load_checkpoint(checkpoints[-1][1])

    def _skip(self, chosen: list[int], pending: int, reason: str, level: int = logging.WARNING) -> UpdateResult:
        """Record and mark experiences that cannot be trained (no update, no version); the record says why."""
        log.log(level, "experiences %s skipped: %s", chosen, reason)
        record = {**self._record(chosen, pending, {}, None, None, 0.0, 0.0, None), "recovered": False, "skipped": reason}
        if not set(chosen) <= recorded_since(self.workdir, min(chosen)):  # a crash between the record and the marks must not record them twice
            append_experience_record(self.workdir, record)
        for index in chosen:
            self.store.mark_trained(index)
        return UpdateResult(chosen, None, record)

    def _record(self, chosen, pending, before, metrics, data, update_seconds, export_seconds, version) -> dict:
        labels, unlabeled = data if data else ((), ())
        metrics = metrics or {}
        return {
            "experience": chosen[-1],
            "time": now_iso(),
            "labeled": int(len(labels)),
            "unlabeled": int(len(unlabeled)),
            "merged": list(chosen),
            "online_accuracy": None,
            "online_correct": 0,
            "online_total": 0,
            "online_accuracy_per_class": {},
            **before,
            "losses": loss_terms(metrics),
            "update_seconds": update_seconds,
            "export_seconds": export_seconds,
            "version": version,
            "stopped_by_budget": bool(metrics.get("stopped_by_budget", False)),
            "backlog": pending - len(chosen),
            "recovered": not data,
        }

    def _load(self, indices: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        size = self.cfg.model.image_size
        parts = [self.store.load(i).decode(size, self.cfg.ingest.wire) for i in indices]  # the limits intake checked
        return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))  # type: ignore[return-value]

    def _checkpoint(self, experience: int) -> None:
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.trainer.save_checkpoint(self.checkpoint_dir / f"exp-{experience:06d}.pt")
        self.last_trained = experience
        for _, old in self._checkpoints()[:-KEEP_CHECKPOINTS]:
            old.unlink(missing_ok=True)

    def _try_publish(
        self, experience: int, metrics: dict, real_images: np.ndarray | None = None, on_phase: callable | None = None
    ) -> Publication:
        """Export and publish the trained student, unless an operator holds publishing.

        ``on_phase(name)`` is called as the export, the parity check and the publish begin.

        A failure leaves the update standing (it is checkpointed) and the served version in place;
        the next update exports again. Two kinds: the export was refused (exporter, checker, parity
        check), or a file could not be written (e.g. a full disk or a read-only repository; the
        repository removes its partial version, so readers never see one).

        A hold (``cl-agent models hold``, ``rollback --hold``) is looked up here at every update (a
        stat), so a hold or a release takes effect without a restart; nothing is exported while
        it lasts. The repository checks it again under its publish lock, so a hold made while
        this export runs still stops it.
        """
        hold = self.repository.publishing_hold()
        if hold is None:
            try:
                return Publication(version=self._publish(experience, metrics, real_images, on_phase or (lambda phase: None)))
            except PublishingHeld as e:
                hold = e.hold
            except ExportError as e:
                why = str(e)
            except OSError as e:
                why = f"could not write the export or the version: {e}"
        if hold is not None:
            log.warning(
                "experience %d trained and checkpointed, not published: publishing held by %s (%s); %s to resume",
                experience, hold.path, hold.describe(), release_hint(self.repository.root, self.repository.model_name),
            )
            return Publication(hold=hold)
        log.error("experience %d trained but not published (the served version stays): %s", experience, why)
        return Publication(error=why)

    def _publish(self, experience: int, metrics: dict, real_images: np.ndarray | None, on_phase: callable) -> int:
        from cl_agent.export import export_onnx

        model = self.cfg.model
        on_phase(EXPORTING)
        with tempfile.TemporaryDirectory(prefix=EXPORT_TEMP_PREFIX, dir=self.workdir) as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            optimized_path = Path(tmp) / OPTIMIZED_FILE if self.cfg.export.save_optimized else None
            parity = export_onnx(
                self.trainer.inference_modules(),
                onnx_path,
                image_size=model.image_size,
                mean=model.mean,
                std=model.std,
                export=self.cfg.export,
                real_images=real_images[: self.cfg.export.parity_samples] if real_images is not None else None,
                optimized_path=optimized_path,
                on_parity_check=lambda: on_phase(CHECKING_PARITY),
            )
            manifest = {
                "class_names": self.class_names(),
                "image_size": model.image_size,
                "experience_index": experience,
                "metrics": metrics,
                "export": _jsonable(parity),
                "backbone": model.backbone,
                "agent_id": self.agent_id,
            }
            optimized = None
            if optimized_path is not None and optimized_path.is_file():
                optimized = OptimizedModel(optimized_path, runtime_environment())
            on_phase(PUBLISHING)
            version = self.repository.publish(onnx_path, manifest, optimized, after=self.last_version or 0, honour_hold=True)
        self.last_version = version
        if self.announcer is not None:
            sha = self.repository.load_manifest(version)["sha256"]
            self.announcer.announce(self.cfg.agent.model_name, version, sha)
        return version


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item() if getattr(value, "ndim", 0) == 0 else value.tolist()
    return value


def update_loop(
    cfg: AgentConfig,
    stop: threading.Event | None = None,
    poll_s: float = 0.5,
    on_result=None,
    on_progress=None,
) -> None:
    """Run updates until ``stop`` is set (the trainer process's main loop)."""
    stop = stop or threading.Event()
    try:
        updater = Updater(cfg, resolve_device(cfg.agent.device, "agent.device"))
    except CLAgentError as e:
        raise TrainerSetupError(str(e)) from None
    log.info("trainer ready: %s, %s at %d px, method %s, on %s",
             cfg.model.backbone, f"{cfg.model.num_classes} classes", cfg.model.image_size, cfg.train.method, updater.device)
    for done in (updater.recovered, updater.republished):
        if done is not None and on_result is not None:
            on_result(done)
    try:
        while not stop.is_set():
            try:
                result = updater.run_once(should_stop=stop.is_set, progress=on_progress)
            except UpdateInterrupted:
                log.info("update interrupted by shutdown; it will be redone on restart")
                return
            if result is None:
                result = updater.publish_released()  # a hold lifted while idle: publish now, not at the next update
            if result is None:
                stop.wait(poll_s)
            elif on_result is not None:
                on_result(result)
    finally:
        updater.close()
