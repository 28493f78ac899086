"""What a running agent leaves in its working directory for people and tools to read.

``state.json``        the agent's current state, rewritten atomically every few seconds (the heartbeat)
``experiences.jsonl`` one JSON object per trained experience, appended and fsynced
``report.png``        written on demand by ``cl-agent report``

The formats are documented in docs/observability.md. ``cl-agent status`` and
``cl-agent report`` read them, so they work on a running agent, a stopped one,
or a copy of its folder on another machine.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from cl_agent.errors import CLAgentError
from cl_agent.repository import ModelRepository, PublishingHold, release_hint
from cl_agent.storage import atomic_write_bytes, atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
EXPERIENCES_FILE = "experiences.jsonl"
REPORT_FILE = "report.png"

# Keys every state.json holds (more may be added).
STATE_KEYS = (
    "pid",  # int: the agent process
    "host",  # str: socket.gethostname() of the agent's machine
    "started_at",  # ISO 8601 UTC
    "updated_at",  # ISO 8601 UTC: the heartbeat; write_state() sets it
    "status",  # "running" | "stopped"
    "last_experience",  # int | null: index of the last trained experience
    "pending_experiences",  # int: experiences cut and waiting to be trained (backlog)
    "model_version",  # int | null: last version published to the repository
    "served_version",  # int | null: version the server reports it serves
    "counters",  # {name: number or {label: number}}: ingest and training counters
    "metrics_port",  # int | null: port of the /metrics endpoint
)
STATUS_VALUES = ("running", "stopped")
# Keys a running agent adds (an older state.json may lack them; readers fall back as noted):
#   "published_version"     int | null: newest version in the model repository, read again when it changes
#                           (a rollback or another publisher included); "model_version" holds the same value
#   "last_trained_version"  int | null: version the agent's last update published (from experiences.jsonl at start)
#   "update"                {...} | null: the update under way (see UpdateProgress.snapshot), null when idle
#   "model_repository"      {"root": absolute repository.root, "model": agent.model_name}: where status finds the hold file
#   "publishing_hold"       {...} | null: the hold on publishing as the agent last read it (see hold_fields), null when none
#   "host_server"           bool: agent.host_server; false: the agent serves nothing, so "served_version" stays null
# Keys a state.json holds only when the agent hosts the server (agent.host_server):
#   "server_restarts"  int: times the hosted server exited and was restarted since the agent started
#   "server_failure"   str | null: why it last exited, while it is down or restarting; null once it runs again

# Keys every experiences.jsonl record holds (more may be added).
EXPERIENCE_KEYS = (
    "experience",  # int: index of the (last) experience trained
    "time",  # ISO 8601 UTC, when training finished
    "labeled",  # int: labeled samples trained on
    "unlabeled",  # int: unlabeled frames used
    "merged",  # [int]: every experience index trained in this update ([experience] unless the "merge" backlog policy combined several)
    "online_accuracy",  # float | null: accuracy of the model *before* training on these labeled samples
    "online_correct",  # int
    "online_total",  # int
    "online_accuracy_per_class",  # {class name: float}
    "losses",  # {term: float}: mean loss terms of the update
    "update_seconds",  # float
    "export_seconds",  # float
    "version",  # int | null: model version published after this update (null if it was not published: see publish_error)
    "stopped_by_budget",  # bool: the time budget cut the update short
)
# A record with "republished" (str: "restart" | "hold released") trains nothing ("merged" is empty): the checkpoint of
# "experience", trained and recorded earlier ("held", or "publish_error"), was published later as "version".

# A heartbeat older than max(STALE_FACTOR * heartbeat_s, MIN_STALE_S) is reported as stale.
DEFAULT_HEARTBEAT_S = 5.0
STALE_FACTOR = 3
MIN_STALE_S = 30.0


# --------------------------------------------------------------------------- time


def now_iso() -> str:
    """Current time as ISO 8601 UTC with milliseconds, e.g. 2026-01-02T03:04:05.678Z."""
    t = dt.datetime.now(dt.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


def parse_iso(text: str) -> dt.datetime:
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def _age_text(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def duration_text(seconds: float) -> str:
    """A short duration for people: 45s, 3m05s, 1h02m."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


# --------------------------------------------------------------------------- the update under way

# The phases of an update, in order, as the trainer process reports them (progress messages with "phase").
TRAINING = "training"  # steps; a message of this phase reports one finished step
CHECKPOINTING = "saving checkpoint"  # after the last step (or the one that spent train.time_budget_s)
EXPORTING = "exporting"  # ONNX export and onnx.checker
CHECKING_PARITY = "checking parity"  # onnxruntime against torch on sample images
PUBLISHING = "publishing"  # the new version written into the model repository
PHASES = (TRAINING, CHECKPOINTING, EXPORTING, CHECKING_PARITY, PUBLISHING)
BURST_S = 0.05  # progress messages read within this of the first one arrived together: they carry no timing


class UpdateProgress:
    """The update under way, as the agent sees it from the trainer process's progress messages.

    Each message names its ``phase`` (one of ``PHASES``; a message without one is a training
    step, as before phases were reported) and the steps done so far: during ``training`` one
    message per finished step, then one when each later phase begins. The phase shown is the
    one last reported, so an update whose time budget ended training early shows its
    checkpoint, export, parity check and publish as they happen, after the steps it did.
    The update lasts until its result arrives (``finish``).
    The ETA extrapolates the time per step measured from the first reported step on (the
    first step carries one-off costs), capped by what is left of the time budget.
    """

    def __init__(self, time_budget_s: float = 0.0, clock: Callable[[], float] = time.monotonic):
        self.time_budget_s = time_budget_s  # 0 = none
        self.clock = clock
        self.finish()

    def finish(self) -> None:
        """The update ended (result, skip, or the trainer died): nothing is under way."""
        self.experience: int | None = None
        self.step = self.steps = 0
        self.phase = TRAINING
        self._first: tuple[float, int] | None = None  # (time, step) of the first progress message
        self._last_time = 0.0  # time of the newest training step message
        self._phase_since = 0.0  # time the current phase was first reported

    def report(self, info: Mapping) -> None:
        """One progress message of the trainer process: {"experience", "phase", "step", "steps", ...}.

        A message without integer ``step`` and ``steps`` or with a ``phase`` that is not a string is ignored.
        """
        now = self.clock()
        experience, step, steps = info.get("experience"), info.get("step"), info.get("steps")
        phase = info.get("phase", TRAINING)
        if not isinstance(step, int) or not isinstance(steps, int) or not isinstance(phase, str):
            return
        if experience != self.experience or self._first is None or step < self.step:  # a new update
            self.finish()
            self.experience, self._first, self._phase_since = experience, (now, step), now
        elif phase == TRAINING and now - self._first[0] < BURST_S:  # read in the same batch as the first: a later baseline, same time
            self._first = (self._first[0], step)
        if phase != self.phase:
            self.phase, self._phase_since = phase, now
        self.step, self.steps = step, steps
        if phase == TRAINING:
            self._last_time = now

    def snapshot(self) -> dict | None:
        """{"experience", "phase", "step", "steps", "elapsed_s", "eta_s", "phase_elapsed_s"}, or None when idle.

        ``elapsed_s``: since the first step was reported; ``eta_s``: seconds of training left
        (null until steps were reported at two different times, 0 once training is over);
        ``phase_elapsed_s``: since the current phase was first reported."""
        if self._first is None:
            return None
        now = self.clock()
        first_time, first_step = self._first
        elapsed = now - first_time
        eta = None
        if self.phase != TRAINING:
            eta = 0.0
        elif self.step > first_step and self._last_time > first_time:
            per_step = (self._last_time - first_time) / (self.step - first_step)
            eta = max(0.0, per_step * (self.steps - self.step) - (now - self._last_time))
            if self.time_budget_s:  # the step that spends the budget is the last
                eta = max(0.0, min(eta, self.time_budget_s - elapsed))
        return {
            "experience": self.experience,
            "phase": self.phase,
            "step": self.step,
            "steps": self.steps,
            "elapsed_s": round(elapsed, 1),
            "eta_s": None if eta is None else round(eta, 1),
            "phase_elapsed_s": round(now - self._phase_since, 1),
        }


# --------------------------------------------------------------------------- state.json


def initial_state(
    *, metrics_port: int | None = None, metrics_host: str = "127.0.0.1", heartbeat_s: float = DEFAULT_HEARTBEAT_S
) -> dict:
    """A complete state for a process that is starting now; the agent updates it and calls write_state()."""
    now = now_iso()
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started_at": now,
        "updated_at": now,
        "status": "running",
        "last_experience": None,
        "pending_experiences": 0,
        "model_version": None,
        "served_version": None,
        "counters": {},
        "metrics_port": metrics_port,
        "metrics_host": metrics_host,  # bind address of the /metrics endpoint
        "heartbeat_s": heartbeat_s,  # how often the agent rewrites this file
    }


def write_state(workdir: str | os.PathLike, state: Mapping) -> Path:
    """Atomically write ``workdir/state.json``, stamping ``updated_at`` with the current time."""
    missing = [k for k in STATE_KEYS if k not in state and k != "updated_at"]
    if missing:
        raise ValueError(f"state for {STATE_FILE} lacks keys {missing}")
    if state["status"] not in STATUS_VALUES:
        raise ValueError(f"state status {state['status']!r} is not one of {STATUS_VALUES}")
    data = dict(state, updated_at=now_iso())
    return atomic_write_text(Path(workdir) / STATE_FILE, json.dumps(_finite(data), indent=2, default=str) + "\n")


def read_state(workdir: str | os.PathLike) -> dict | None:
    """``workdir/state.json`` as a dict; None if there is none; CLAgentError if it is unreadable."""
    path = Path(workdir) / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CLAgentError(f"cannot read agent state {path}: {e}") from None
    if not isinstance(state, dict):
        raise CLAgentError(f"agent state {path} is not a JSON object")
    return state


# --------------------------------------------------------------------------- experiences.jsonl


def _finite(value):
    """NaN and infinities become null, so every line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def append_experience_record(workdir: str | os.PathLike, record: Mapping) -> Path:
    """Append one record to ``workdir/experiences.jsonl`` and fsync it; ``time`` defaults to now.

    If a crash left a torn last line, the new record starts on a fresh line.
    """
    record = dict(record)
    record.setdefault("time", now_iso())
    missing = [k for k in EXPERIENCE_KEYS if k not in record]
    if missing:
        raise ValueError(f"experience record lacks keys {missing}")
    line = json.dumps(_finite(record), ensure_ascii=False, default=str).encode("utf-8") + b"\n"

    path = Path(workdir) / EXPERIENCES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)
    return path


def read_experience_records(workdir: str | os.PathLike) -> list[dict]:
    """All records of ``workdir/experiences.jsonl`` in order ([] if none).

    A line that is not a JSON object (a write torn by a crash) is skipped; a torn
    last line silently, one in the middle with a warning.
    """
    return [record for _, record in _numbered_records(workdir)]


def _numbered_records(workdir: str | os.PathLike, drop: tuple[str, ...] = ()) -> list[tuple[int, dict]]:
    """(line number, record) for every JSON object line of ``workdir/experiences.jsonl``, read line by line.

    ``drop``: keys left out of every record (what a caller does not use need not be held).
    """
    path = Path(workdir) / EXPERIENCES_FILE
    records = []
    try:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                record = _parse_record(raw)
                if record is not None:
                    for key in drop:
                        record.pop(key, None)
                    records.append((number, record))
                elif not raw.endswith(b"\n"):  # every append ends its line: this one was cut short
                    log.debug("skipping torn last line of %s", path)
                else:
                    log.warning("skipping unreadable line %d of %s", number, path)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CLAgentError(f"cannot read {path}: {e.strerror or e}") from None
    return records


def records_backwards(workdir: str | os.PathLike, block_bytes: int = 1 << 16) -> Iterator[dict]:
    """The records of ``workdir/experiences.jsonl``, newest first, read from the end in blocks.

    At start the agent and the trainer need only the newest records; reading the whole file
    would take seconds and hundreds of MB after tens of thousands of experiences. Lines that
    are not JSON objects (a torn write) are skipped, as by ``read_experience_records``.
    """
    path = Path(workdir) / EXPERIENCES_FILE
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    except OSError as e:
        raise CLAgentError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        position = f.seek(0, os.SEEK_END)
        partial = b""  # the start of a line whose beginning lies in the block before
        while position > 0:
            step = min(block_bytes, position)
            position -= step
            f.seek(position)
            lines = (f.read(step) + partial).split(b"\n")
            partial = lines.pop(0) if position > 0 else b""
            for raw in reversed(lines):
                record = _parse_record(raw)
                if record is not None:
                    yield record


def _parse_record(raw: bytes) -> dict | None:
    if not raw.strip():
        return None
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def recorded_since(workdir: str | os.PathLike, first: int) -> set[int]:
    """The experience indices >= ``first`` that some record covers (its ``merged`` list).

    Records are appended in training order, which is experience order, so the search reads
    backwards and stops at the first record wholly below ``first``.
    """
    found: set[int] = set()
    for record in records_backwards(workdir):
        merged = [i for i in record.get("merged") or () if isinstance(i, int) and not isinstance(i, bool)]
        if merged and max(merged) < first:
            break
        found.update(i for i in merged if i >= first)
    return found


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def record_problem(record: Mapping) -> str | None:
    """Why ``cl-agent status`` / ``report`` cannot use an experience record (edited or damaged by hand), or None."""
    losses = record.get("losses")
    if losses is not None and not isinstance(losses, Mapping):
        return f"'losses' = {losses!r}: expected an object of loss terms"
    bad_terms = {k: v for k, v in (losses or {}).items() if v is not None and not _is_number(v)}
    if bad_terms:
        return f"'losses' = {losses!r}: terms {sorted(bad_terms)} are not numbers"
    for key in ("experience", "online_correct", "online_total"):
        value = record.get(key)
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
            return f"{key!r} = {value!r}: expected an integer"
    value = record.get("online_accuracy")
    if value is not None and not _is_number(value):
        return f"'online_accuracy' = {value!r}: expected a number or null"
    return None


def usable_experience_records(workdir: str | os.PathLike) -> tuple[list[dict], list[str]]:
    """(records status and report can use, one message per record skipped as malformed).

    Without their per-class accuracies, which neither shows: they are most of a record's size
    (with 100 classes, 50,000 records took 900 MB to hold whole).
    """
    path = Path(workdir) / EXPERIENCES_FILE
    records, skipped = [], []
    for number, record in _numbered_records(workdir, drop=("online_accuracy_per_class",)):
        problem = record_problem(record)
        if problem is None:
            records.append(record)
        else:
            skipped.append(f"skipping line {number} of {path}: {problem}")
    return records, skipped


def online_summary(records: list[dict]) -> dict:
    """Cumulative online accuracy over records: {"correct", "total", "accuracy" (None if total is 0)}."""
    correct = sum(int(r.get("online_correct") or 0) for r in records)
    total = sum(int(r.get("online_total") or 0) for r in records)
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None}


# --------------------------------------------------------------------------- liveness


def pid_alive(pid: int) -> bool:
    """True if a process with this id exists on this machine (it may belong to another user)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False  # os.kill(0, ...) would signal our own process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe_liveness(state: Mapping, now: dt.datetime | None = None) -> tuple[bool, str]:
    """(running, one-line explanation) from the pid and the heartbeat age."""
    now = now or dt.datetime.now(dt.timezone.utc)
    pid, host = state.get("pid"), state.get("host")
    try:
        age = (now - parse_iso(str(state["updated_at"]))).total_seconds()
    except (KeyError, ValueError):
        age = math.inf
    try:
        heartbeat_s = float(state.get("heartbeat_s") or DEFAULT_HEARTBEAT_S)
    except (TypeError, ValueError):
        heartbeat_s = DEFAULT_HEARTBEAT_S
    stale_after = max(STALE_FACTOR * heartbeat_s, MIN_STALE_S)
    beat = f"last heartbeat {_age_text(age)} ago" if math.isfinite(age) else "no readable heartbeat"

    if state.get("status") == "stopped":
        if state.get("stop_error"):  # the agent stopped itself on a failure (exit code 1)
            return False, f"stopped on an error (pid {pid} on {host}): {state['stop_error']}; {beat}"
        return False, f"stopped (pid {pid} on {host} exited cleanly; {beat})"
    if host != socket.gethostname():
        if age <= stale_after:
            return True, f"running on {host} (pid {pid}; {beat}; pid not checkable from here)"
        return False, f"not responding: on {host} (pid {pid}), {beat}"
    if not pid_alive(pid):
        return False, f"not running: pid {pid} is gone without a clean stop (crashed or killed; {beat})"
    if age > stale_after:
        return True, f"running (pid {pid}) but {beat}; expected every {heartbeat_s:g} s: busy or stuck?"
    return True, f"running (pid {pid}, {beat})"


# --------------------------------------------------------------------------- commands


def _flatten(counters: Mapping, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in counters.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            items.extend(_flatten(value, name + "."))
        else:
            items.append((name, value))
    return items


def _losses_text(losses: Mapping) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in losses.items()) or "none"


def _or_none(value, fmt: str = "{}") -> str:
    return "none" if value is None else fmt.format(value)


def _check_workdir(workdir: Path, must_exist: bool = True) -> Path:
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise CLAgentError(f"{workdir} is not a folder: --workdir takes the agent's working directory (agent.workdir)")
    if must_exist and not workdir.is_dir():
        raise CLAgentError(f"no agent working directory at {workdir} (folder not found)")
    return workdir


def _warn(messages: list[str]) -> None:
    for message in messages:
        print(f"warning: {message}", file=sys.stderr)


def _hosted_server_row(state: Mapping) -> list[tuple[str, str]]:
    """One row while a running agent's hosted server is down and being restarted, else none."""
    failure = state.get("server_failure")
    if not failure or state.get("status") != "running":
        return []
    restarts = state.get("server_restarts") or 0
    return [("hosted server", f"restarting ({restarts} restart{'s' if restarts != 1 else ''}; last: {failure})")]


def _served_version_text(state: Mapping) -> str:
    """The hosted server's version; without one (``host_server`` false) the agent does not know what is served."""
    if state.get("host_server") is False:
        return ("not tracked by this agent (agent.host_server: false): ask the server with "
                "`cl-agent predict --status --endpoint ENDPOINT`")
    return _or_none(state.get("served_version"))


def _update_rows(state: Mapping, running: bool = True) -> list[tuple[str, str]]:
    """The update under way (state.json ``update``), while the agent runs; none when idle.

    ``running``: false when the agent is gone without a clean stop (``describe_liveness``): its last
    heartbeat's update was interrupted there, and is shown so, without a time left."""
    update = state.get("update")
    if not isinstance(update, Mapping) or state.get("status") != "running":
        return []
    step, steps, phase = update.get("step"), update.get("steps"), update.get("phase")
    if not running:
        text = f"experience {update.get('experience')} interrupted"
        if _is_number(step) and _is_number(steps):
            text += f" at step {step}/{steps}"
        if phase in (EXPORTING, CHECKING_PARITY, PUBLISHING):  # its checkpoint was saved: not trained again
            return [("update", f"{text} ({phase}); its checkpoint is published on restart, not retrained")]
        if phase == CHECKPOINTING:
            return [("update", f"{text} ({phase}); redone on restart unless its checkpoint was saved")]
        return [("update", f"{text} ({phase}); redone on restart")]
    text = f"experience {update.get('experience')}: {phase}"
    if phase is not None and phase != TRAINING:  # after training (any phase name, an older agent's too)
        text += f" after {step}/{steps} steps"
        if _is_number(update.get("phase_elapsed_s")):
            text += f" (for {duration_text(update['phase_elapsed_s'])})"
        return [("update", text)]
    if _is_number(step) and _is_number(steps) and steps > 0:
        text += f", step {step}/{steps} ({step / steps:.0%})"
    if _is_number(update.get("elapsed_s")):
        text += f", {duration_text(update['elapsed_s'])} elapsed"
    eta = update.get("eta_s")
    text += f", about {duration_text(eta)} left" if _is_number(eta) else ", time left not known yet"
    return [("update", text)]


def hold_fields(hold: PublishingHold | None) -> dict | None:
    """A hold on publishing as state.json keeps it (``publishing_hold``), or None."""
    if hold is None:
        return None
    return {"path": str(hold.path), "held_by": hold.held_by, "held_at": hold.held_at, "reason": hold.reason,
            "problem": hold.problem}


def _publishing_hold(state: Mapping) -> tuple[PublishingHold | None, str]:
    """(the hold on publishing the agent's model, or None; the command that lifts it).

    Read from the hold file itself where the repository is reachable from here (a release after the
    agent's last heartbeat shows at once), else as the agent last read it (a copy of its folder)."""
    where = state.get("model_repository")
    root, model = (where.get("root"), where.get("model")) if isinstance(where, Mapping) else (None, None)
    hint = release_hint(root, model) if isinstance(root, str) and isinstance(model, str) else "`cl-agent models release`"
    if hint != "`cl-agent models release`":
        try:
            repository = ModelRepository(root, model)
            if repository.model_dir.is_dir():
                return repository.publishing_hold(), hint
        except (CLAgentError, OSError):  # a name edited by hand, an unreadable folder: as the agent saw it
            pass
    fields = state.get("publishing_hold")
    if not isinstance(fields, Mapping):
        return None, hint
    text = {k: fields.get(k) if isinstance(fields.get(k), str) else None for k in ("held_by", "held_at", "reason", "problem")}
    return PublishingHold(Path(str(fields.get("path") or "")), **text), hint


def _published_version(state: Mapping):
    """The repository's newest version; an agent older than ``published_version`` wrote ``model_version``."""
    return state.get("published_version", state.get("model_version"))


RESOLVED_CONFIGS = ("config.yaml", "ingest-config.yaml")  # written at start by `cl-agent run` and `cl-agent ingest`


def is_ingest_only(workdir: Path) -> bool:
    """Whether ``workdir`` belongs to an ingestion-only process (``cl-agent ingest``), which keeps no state.json."""
    return (workdir / "ingest-config.yaml").exists() and not (workdir / STATE_FILE).exists() \
        and not (workdir / EXPERIENCES_FILE).exists()


def control_of(workdir: Path) -> tuple[str, bool, Path]:
    """Where this machine reaches the control endpoint of the agent (or ``cl-agent ingest``) of ``workdir``,
    whether it uses CURVE, and the resolved config it was read from (the newer one when both exist).
    CLAgentError when there is no such config, it cannot be read, its endpoint is empty, or the process
    that held the folder is gone."""
    from cl_agent.config import ConfigError, connect_endpoint, load_config
    from cl_agent.storage import WORKDIR_LOCK_FILE

    found = [workdir / name for name in RESOLVED_CONFIGS if (workdir / name).is_file()]
    if not found:
        raise CLAgentError(
            f"no resolved config ({' or '.join(RESOLVED_CONFIGS)}) in {workdir}, so its control endpoint is unknown: "
            "has an agent run there? pass --config FILE (the agent's config) or --control ENDPOINT"
        )
    path = max(found, key=lambda p: p.stat().st_mtime)
    try:
        ingest = load_config(path).ingest
    except (ConfigError, OSError) as e:
        raise CLAgentError(f"cannot read the control endpoint from {path}: {e}") from None
    if not ingest.control_endpoint:
        raise CLAgentError(f"ingest.control_endpoint is empty in {path}, so that agent answers no status queries")
    holder = _lock_holder(workdir / WORKDIR_LOCK_FILE)
    if holder is not None and not pid_alive(holder):
        raise CLAgentError(f"not running: pid {holder}, the last process that held {workdir}, is gone")
    return connect_endpoint(ingest.control_endpoint), ingest.curve.enabled, path


def _lock_holder(lock_file: Path) -> int | None:
    """The pid written in a working directory's lock file (read only: the lock itself is never taken here)."""
    try:
        return int(lock_file.read_text().strip())
    except (OSError, ValueError):
        return None


def print_status(workdir: Path) -> int:
    """Print an agent's state from its working directory; exit code 0. CLAgentError if there is no agent there."""
    workdir = _check_workdir(workdir)
    state = read_state(workdir)
    records, skipped = usable_experience_records(workdir)
    _warn(skipped)
    if state is None and not records and not skipped:
        if is_ingest_only(workdir):
            raise CLAgentError(
                f"{workdir} is the folder of an ingestion-only process (cl-agent ingest), which writes no {STATE_FILE}: "
                f"ask it for its counters with `cl-agent status --live --workdir {workdir}`"
            )
        raise CLAgentError(
            f"no agent state in {workdir}: neither {STATE_FILE} nor {EXPERIENCES_FILE} found "
            "(is this the agent.workdir of the config?)"
        )

    rows: list[tuple[str, str]] = [("workdir", str(workdir))]
    if state is None:
        rows.append(("agent", f"unknown ({STATE_FILE} missing)"))
    else:
        running, liveness = describe_liveness(state)
        metrics_host = state.get("metrics_host") or "127.0.0.1"
        rows += [
            ("agent", liveness),
            ("started", str(state.get("started_at"))),
            ("updated", str(state.get("updated_at"))),
            ("last experience", _or_none(state.get("last_experience"))),
            ("pending", f"{state.get('pending_experiences', 0)} experience(s) waiting to be trained"),
            # not running on this machine: the pid is gone without a clean stop (on another one it may be unreachable)
            *_update_rows(state, running or state.get("host") != socket.gethostname()),
            ("published version", _or_none(_published_version(state))),
            ("served version", _served_version_text(state)),
            *_hosted_server_row(state),
            ("metrics", _or_none(state.get("metrics_port"), f"http://{metrics_host}:{{}}/metrics")),
        ]
    trained = [r for r in records if not r.get("republished")]  # a publication record trains nothing
    hold, release = _publishing_hold(state or {})
    unpublished = None  # the last trained experience, while its checkpoint waits for a hold to be lifted
    if trained:
        last = trained[-1]
        published_later = records[-1] is not last  # its checkpoint was published after it (a restart, a release)
        total = online_summary(trained)
        acc = last.get("online_accuracy")
        rows += [
            ("trained records", f"{len(trained)} (last: experience {last.get('experience')} at {last.get('time')})"),
            (
                "online accuracy",
                f"last {_or_none(acc, '{:.3f}')} ({last.get('online_correct', 0)}/{last.get('online_total', 0)}), "
                f"cumulative {_or_none(total['accuracy'], '{:.3f}')} ({total['correct']}/{total['total']})",
            ),
            ("last losses", _losses_text(last.get("losses") or {})),
            # a skipped experience publishes nothing: this is the version of the last update that published one
            ("last trained version", _or_none(next((r["version"] for r in reversed(records) if r.get("version") is not None), None))),
        ]
        if last.get("skipped"):
            rows.append(("last skipped", f"experience {last.get('experience')}: {last['skipped']} (no update, no version)"))
        if last.get("held") and not published_later:
            unpublished = last.get("experience")
            if hold is None:
                rows.append(("not published", f"experience {unpublished}: trained while publishing was held; released "
                                              "since (the agent publishes it at once while it runs, else at its start)"))
        if last.get("publish_error") and not published_later:
            rows.append(("not published", f"experience {last.get('experience')}: {last['publish_error']} (trained; the served version stays)"))
    else:
        rows.append(("trained records", "none yet"))
    if hold is not None:  # as the hold file says: `cl-agent models release` lifts it at once
        text = f"{hold.describe()} ({hold.path})"
        if unpublished is not None:
            text += f"; experience {unpublished} trained and checkpointed, not published"
        rows.append(("publishing held", f"{text}; {release} resumes publishing"))

    width = max(len(name) for name, _ in rows)
    lines = [f"{name + ':':<{width + 1}} {value}" for name, value in rows]
    raw_counters = (state or {}).get("counters")
    counters = _flatten(raw_counters) if isinstance(raw_counters, Mapping) else []
    if counters:
        lines.append("counters:")
        lines += [f"  {name} = {value}" for name, value in counters]
    print("\n".join(lines))
    return 0


def _render_report(records: list[dict], title: str) -> bytes:
    buffer = io.BytesIO()
    _report_figure(records, title).savefig(buffer, format="png")
    return buffer.getvalue()


def _report_figure(records: list[dict], title: str):
    """The report's figure: online accuracy above, loss terms below, each legend outside its axes (right),
    so it never covers a line."""
    # The object-oriented API with an explicit Agg canvas: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    x = [r.get("experience", i) for i, r in enumerate(records)]
    per_experience = [math.nan if r.get("online_accuracy") is None else r["online_accuracy"] for r in records]
    cumulative, correct, total = [], 0, 0
    for r in records:
        correct += int(r.get("online_correct") or 0)
        total += int(r.get("online_total") or 0)
        cumulative.append(correct / total if total else math.nan)
    terms = list(dict.fromkeys(term for r in records for term in (r.get("losses") or {})))

    figure = Figure(figsize=(10, 6.5), dpi=100, layout="constrained")  # wider: the legends sit beside the plots
    FigureCanvasAgg(figure)
    accuracy_axes, loss_axes = figure.subplots(2, 1, sharex=True)
    accuracy_axes.plot(x, per_experience, "o-", label="per experience (before training on it)")
    accuracy_axes.plot(x, cumulative, "-", linewidth=2, label="cumulative")
    accuracy_axes.set_ylim(0, 1)
    accuracy_axes.set_ylabel("online accuracy")
    accuracy_axes.grid(alpha=0.3)
    accuracy_axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small")
    accuracy_axes.set_title(title)
    for term in terms:
        values = [(r.get("losses") or {}).get(term) for r in records]
        loss_axes.plot(x, [math.nan if v is None else v for v in values], ".-", label=term)
    loss_axes.set_xlabel("experience")
    loss_axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axes.set_ylabel("mean loss term")
    loss_axes.grid(alpha=0.3)
    if terms:
        loss_axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, fontsize="small")
    return figure


def write_report(workdir: Path, out: Path | None = None) -> int:
    """Plot online accuracy and loss terms per experience to a PNG (default WORKDIR/report.png); print its path."""
    workdir = _check_workdir(workdir)
    records, skipped = usable_experience_records(workdir)
    _warn(skipped)
    records = [r for r in records if not r.get("republished")]  # a publication record trains nothing
    if not records:
        if skipped:
            raise CLAgentError(
                f"nothing to report: all {len(skipped)} record(s) in {workdir / EXPERIENCES_FILE} are malformed"
            )
        raise CLAgentError(
            f"nothing to report: no trained experiences recorded in {workdir / EXPERIENCES_FILE} "
            "(the agent appends one line per trained experience)"
        )
    out = Path(out) if out is not None else workdir / REPORT_FILE
    summary = online_summary(records)
    accuracy = _or_none(summary["accuracy"], "{:.3f}")
    title = f"{workdir.name}: {len(records)} updates, cumulative online accuracy {accuracy}"
    try:
        atomic_write_bytes(out, _render_report(records, title), 0o644)  # for anyone who can see the workdir
    except OSError as e:
        raise CLAgentError(f"cannot write report {out}: {e.strerror or e}") from None
    print(out)
    return 0
