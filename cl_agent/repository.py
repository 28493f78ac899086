"""The model repository: Triton layout, atomic publishing, retention, rollback, announcements.

Layout (Triton's onnxruntime backend can serve it as is)::

    <root>/<model>/config.pbtxt          model configuration (input/output names, types, dims)
    <root>/<model>/<version>/model.onnx  one folder per integer version
    <root>/<model>/<version>/manifest.json
    <root>/<model>/<version>/model.optimized.onnx  optional: onnxruntime's optimised graph of model.onnx
                                                   for one machine type (see ``OptimizedModel``)
    <root>/<model>/<version>/model.optimized.onnx.data  its weights, when it keeps them apart
    <root>/<model>/.last_version         highest version ever published (survives retention)
    <root>/<model>/.publish.lock         serialises publishers (flock)
    <root>/<model>/.publish-hold.json    only while an operator holds publishing (``models hold``)

INVARIANT: a folder named by an integer is complete. A version is written into
a hidden temp folder, every file and the folder are fsynced, and only then is it
renamed into place; retention renames a folder away before deleting it. Readers
also check that a version has a manifest and that the model's sha256 matches it,
so a folder left by a crash or copied by hand is never served.

INVARIANT: versions only increase. The next version is one more than both the
persisted counter and the highest folder name, so neither retention nor a
restart can make a number come back.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from cl_agent.errors import CLAgentError, bind_failure
from cl_agent.storage import atomic_write_text, fsync_dir

log = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
OPTIMIZED_FILE = "model.optimized.onnx"
OPTIMIZED_DATA_FILE = OPTIMIZED_FILE + ".data"  # the name the optimised graph records for its weights
MANIFEST_FILE = "manifest.json"
CONFIG_FILE = "config.pbtxt"
COUNTER_FILE = ".last_version"
LOCK_FILE = ".publish.lock"
HOLD_FILE = ".publish-hold.json"  # hidden and not a number: version scans, the fetch service and Triton pass it by
REQUIRED_MANIFEST_KEYS = ("class_names", "image_size")
DELETED_NAME = re.compile(r"\.deleted-[0-9]+-[0-9a-f]{8}")  # what retention renames a version folder to before deleting it
TEMP_NAME = re.compile(r"\.tmp-[0-9]+-[0-9a-f]{8}")  # where publish and install write a version before its rename
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")  # one path component that stays inside the repository root


CHUNK = 1 << 18  # bytes read, hashed (and written) at a time
WRITE_OUT_CHUNKS = 16  # a paced copy hands its data to the disk every 16 chunks (4 MiB), not in one burst at the end
PAUSE_S = 0.0003  # default pause after each chunk (see ``sha256_file``)
FILE_MODE = 0o644  # published files: a server or Triton running as another user must read them, whatever the umask
DIR_MODE = 0o755  # folders this repository creates


def sha256_file(path: str | os.PathLike, pause_s: float = 0.0) -> str:
    """sha256 of a file, read in chunks; with ``pause_s`` the thread sleeps that long after each one.

    The pauses are for work that shares the cores with a server: a thread streaming 45 MB
    without a break keeps the CPU until the scheduler's slice ends, so requests arriving
    meanwhile wait (tools/bench_contention.py on 2 cores: p99 4.4 ms against 3.5 ms with
    nothing beside the server; 3.0 ms with 0.3 ms pauses after each 256 KiB). It costs about
    0.1 s per 45 MB.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
            if pause_s:
                time.sleep(pause_s)
    return digest.hexdigest()


def check_model_name(model_name: object) -> str:
    """``model_name`` if it is one safe path component (ASCII letters, digits, ``-``, ``_``, ``.``; not starting with ``.``)."""
    if not isinstance(model_name, str) or not MODEL_NAME_PATTERN.fullmatch(model_name):
        raise CLAgentError(
            f"bad model name {model_name!r}: use letters, digits, '-', '_' and '.', not starting with '.' "
            "(it names a folder inside the repository root)"
        )
    return model_name


def models_in(root: str | os.PathLike) -> list[str]:
    """The models in the repository ``root``, sorted: folders with a version, or with the counter a publish leaves.

    A folder that holds neither (say, one a mistyped command made) is not a model."""
    root = Path(root)
    try:
        folders = [p for p in root.iterdir() if MODEL_NAME_PATTERN.fullmatch(p.name) and p.is_dir()]
    except OSError:
        return []
    return sorted(p.name for p in folders if ModelRepository(root, p.name).has_published())


def triton_config(model_name: str, image_size: int, num_classes: int, max_batch: int = 64) -> str:
    """config.pbtxt for Triton's onnxruntime backend (batch dimension implicit)."""
    return (
        f'name: "{model_name}"\n'
        'platform: "onnxruntime_onnx"\n'
        f"max_batch_size: {max_batch}\n"
        "input [\n"
        f'  {{ name: "images", data_type: TYPE_UINT8, dims: [ {image_size}, {image_size}, 3 ] }}\n'
        "]\n"
        "output [\n"
        f'  {{ name: "logits", data_type: TYPE_FP32, dims: [ {num_classes} ] }},\n'
        f'  {{ name: "probs", data_type: TYPE_FP32, dims: [ {num_classes} ] }}\n'
        "]\n"
        "version_policy: { latest: { num_versions: 1 } }\n"
        "dynamic_batching: { max_queue_delay_microseconds: 2000 }\n"
    )


def _make_public_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with mode ``DIR_MODE``; an existing folder is left as it is."""
    for folder in reversed([path, *path.parents]):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        os.chmod(folder, DIR_MODE)


def _copy_hashed(source: Path, target: Path, pause_s: float = 0.0) -> str:
    """Copy ``source`` to ``target`` (fsynced) and return the sha256 of the bytes written, in one pass.

    With ``pause_s`` the copy sleeps after each chunk and writes its data out every
    ``WRITE_OUT_CHUNKS`` chunks (as ``sha256_file``: a publish must not hold up a server on
    the same cores; one 45 MB write-out at the end stalled requests as much as the copy).
    """
    digest = hashlib.sha256()
    with open(source, "rb") as src, open(target, "xb") as dst:
        os.fchmod(dst.fileno(), FILE_MODE)
        n = 0
        while block := src.read(CHUNK):
            digest.update(block)
            dst.write(block)
            n += 1
            if pause_s:
                if n % WRITE_OUT_CHUNKS == 0:
                    dst.flush()
                    os.fdatasync(dst.fileno())
                time.sleep(pause_s)
        dst.flush()
        os.fsync(dst.fileno())
    return digest.hexdigest()


def manifest_problem(manifest: dict) -> str | None:
    """Why a loaded manifest cannot describe a published version (None if it can): a field publish always writes is missing or mistyped."""
    expected = {"version": int, "sha256": str, "class_names": list, "image_size": int}
    missing = [k for k in expected if k not in manifest]
    if missing:
        return f"manifest is missing {', '.join(missing)}"
    wrong = [f"{k} is {type(manifest[k]).__name__}" for k, kind in expected.items()
             if not isinstance(manifest[k], kind) or isinstance(manifest[k], bool)]
    return f"manifest has wrong-typed fields: {', '.join(wrong)}" if wrong else None


def mismatched_files(files: dict[Path, object], pause_s: float = 0.0) -> dict[Path, str | None]:
    """The files of ``files`` (path -> the manifest's sha256) that are missing (None) or differ (why).

    The one check of a version's files against its manifest: a server refuses to load a graph
    that fails it, rollback refuses a model that fails it and skips an optimised graph that
    does, and ``cl-agent models verify`` reports both.
    """
    found: dict[Path, str | None] = {}
    for path, expected in files.items():
        try:
            actual = sha256_file(path, pause_s)
        except FileNotFoundError:
            found[path] = None
            continue
        if actual != expected:
            found[path] = f"sha256 {actual[:12]}... does not match the manifest's {str(expected)[:12]}..."
    return found


def optimized_files(version_dir: Path, entry: dict) -> dict[Path, object]:
    """The files of a version's optimised graph (the graph, its weights file if any) and their manifest sha256."""
    files = {version_dir / OPTIMIZED_FILE: entry.get("sha256")}
    if "data_sha256" in entry:
        files[version_dir / OPTIMIZED_DATA_FILE] = entry["data_sha256"]
    return files


@dataclass
class OptimizedModel:
    """onnxruntime's optimised graph of a model, saved when the export's parity check opened it.

    Opening it needs no graph optimisation (a fraction of the time and memory traffic of
    optimising ``model.onnx`` again, which is what a hot swap would otherwise do next to the
    serving thread), but it may hold layouts for one CPU: ``environment`` (onnxruntime
    version, machine, instruction sets) says where it was made, and a server elsewhere
    opens ``model.onnx`` instead.

    Its weights may sit beside it in ``<name>.data`` (the exporter writes them so): the
    graph records that name, onnxruntime memory-maps the file instead of copying the
    weights into the new session, and the version folder stores both as ``model.optimized.onnx``
    and ``model.optimized.onnx.data``.
    """

    path: Path
    environment: dict

    @property
    def data_path(self) -> Path:
        path = Path(self.path)
        return path.with_name(path.name + ".data")


@dataclass(frozen=True)
class PublishingHold:
    """An operator's hold on publishing a model (``cl-agent models hold``), read from its marker file.

    A marker that cannot be read (damaged, or made by hand) still holds: ``problem`` says why
    its fields are missing. Only ``cl-agent models release`` (or removing the file) lifts it.
    """

    path: Path
    held_by: str | None = None  # user@host that made it
    held_at: str | None = None  # UTC, ISO 8601
    reason: str | None = None
    problem: str | None = None  # why the marker could not be read (it holds all the same)

    def describe(self) -> str:
        """``since <when> by <who>: <reason>``, with what is known."""
        parts = [f"since {self.held_at}" if self.held_at else "", f"by {self.held_by}" if self.held_by else ""]
        text = " ".join(p for p in parts if p) or "(no details)"
        if self.reason:
            text += f": {self.reason}"
        if self.problem:
            text += f" [{self.problem}]"
        return text


class PublishingHeld(CLAgentError):
    """A publish that honours holds found one in place (see ``ModelRepository.publish``)."""

    def __init__(self, hold: PublishingHold):
        super().__init__(f"publishing held by {hold.path} ({hold.describe()})")
        self.hold = hold


def _operator() -> str:
    """user@host of this process, for a hold's ``held_by``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (OSError, KeyError):  # no login name and no passwd entry (a bare container)
        user = f"uid {os.getuid()}"
    return f"{user}@{socket.gethostname()}"


class ModelRepository:
    """Versions of one model under ``root/model_name``; safe against crashes and concurrent publishers."""

    def __init__(self, root: str | os.PathLike, model_name: str, keep_last: int = 5, pause_s: float = PAUSE_S):
        check_model_name(model_name)
        if keep_last < 1:
            raise CLAgentError(f"keep_last must be >= 1, got {keep_last}")
        if not 0 <= pause_s <= 0.1:
            raise CLAgentError(f"pause_s must be within 0-0.1 s, got {pause_s}")
        self.root = Path(root)
        self.model_name = model_name
        self.keep_last = keep_last
        self.pause_s = pause_s  # after each chunk a publish copies (see _copy_hashed); 0 = full speed
        self.model_dir = self.root / model_name

    # ----------------------------------------------------------------- reading

    def _numbered_dirs(self) -> list[int]:
        if not self.model_dir.is_dir():
            return []
        return sorted(int(p.name) for p in self.model_dir.iterdir() if p.name.isascii() and p.name.isdigit() and p.is_dir())

    def versions(self) -> list[int]:
        """Published versions, ascending (folders with a model and a readable manifest)."""
        return [v for v in self._numbered_dirs() if self._looks_complete(v)]

    def _looks_complete(self, version: int) -> bool:
        folder = self.version_dir(version)
        return (folder / MODEL_FILE).is_file() and (folder / MANIFEST_FILE).is_file()

    def has_published(self) -> bool:
        """Whether this model is in the repository: a version folder, or the counter a publish leaves."""
        try:
            return bool(self._numbered_dirs()) or (self.model_dir / COUNTER_FILE).is_file()
        except OSError:  # a folder that cannot be listed: a model all the same
            return True

    def models_there(self) -> str:
        """``models there: a, b`` (``models there: none``): the models of this root, for a message that this one is not there."""
        return f"models there: {', '.join(models_in(self.root)) or 'none'}"

    def _absent_note(self) -> str:
        """`` (models there: a, b)`` when this model has no version and the root holds other models, else ''."""
        others = [m for m in models_in(self.root) if m != self.model_name]
        return f" (models there: {', '.join(others)})" if others and not self.versions() else ""

    def latest_version(self) -> int | None:
        found = self.versions()
        return found[-1] if found else None

    def version_dir(self, version: int) -> Path:
        return self.model_dir / str(int(version))

    def model_path(self, version: int) -> Path:
        return self.version_dir(version) / MODEL_FILE

    def chosen_manifest(self, version: int | None, none_hint: str = "") -> tuple[int, dict]:
        """(version, its manifest) for ``version``, the newest when None; CLAgentError if there is none.

        ``none_hint``: appended to the error when the repository holds no version (what to do instead)."""
        if version is None:
            version = self.latest_version()
            if version is None:
                raise CLAgentError(f"no versions of {self.model_name!r} in {self.root}{self._absent_note()}{none_hint}")
        return version, self.load_manifest(version)

    def load_manifest(self, version: int) -> dict:
        path = self.version_dir(version) / MANIFEST_FILE
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            known = ", ".join(map(str, self.versions())) or f"none; {self.models_there()}"
            raise CLAgentError(
                f"model {self.model_name!r} has no version {version} in {self.root} (versions: {known})"
            ) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CLAgentError(f"manifest {path} is not valid JSON: {e}") from None
        if not isinstance(manifest, dict) or manifest.get("version") != version:
            raise CLAgentError(f"manifest {path} does not describe version {version}")
        return manifest

    def verify(self, version: int) -> dict:
        """The manifest of ``version`` after checking the model file's sha256 against it."""
        manifest = self.load_manifest(version)
        for path, why in mismatched_files({self.model_path(version): manifest.get("sha256")}).items():
            raise CLAgentError(f"{path}: {why or 'missing'}")  # the one file: the first problem is the only one
        return manifest

    def last_version_ever(self) -> int:
        """Highest version ever published or present (0 if none)."""
        counter = 0
        try:
            counter = int((self.model_dir / COUNTER_FILE).read_text().strip() or 0)
        except FileNotFoundError:
            pass
        except ValueError as e:
            raise CLAgentError(f"{self.model_dir / COUNTER_FILE} is not an integer: {e}") from None
        return max([counter, *self._numbered_dirs()])

    @property
    def hold_path(self) -> Path:
        return self.model_dir / HOLD_FILE

    def publishing_hold(self) -> PublishingHold | None:
        """The hold on publishing this model, or None: one stat when there is none (checked at every publish)."""
        path = self.hold_path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as e:  # present but unreadable: a hold all the same
            return PublishingHold(path, problem=f"unreadable: {e}")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            return PublishingHold(path, problem=f"not valid JSON: {e}")
        if not isinstance(data, dict):
            return PublishingHold(path, problem=f"not a JSON object: {text[:80]!r}")
        fields = {k: data.get(k) if isinstance(data.get(k), str) else None for k in ("held_by", "held_at", "reason")}
        return PublishingHold(path, **fields)

    # ----------------------------------------------------------------- writing

    def hold(self, reason: str | None = None, replace: bool = False) -> tuple[PublishingHold, PublishingHold | None]:
        """Hold publishing (written atomically under the publish lock): (the hold in force, the one already there or None).

        A hold already there is kept (its operator, time and reason stand) unless ``replace``.
        Refused for a model that has never published here (a mistyped name would hold nothing);
        nothing is written then. A publish that honours holds and takes the lock after this
        returns publishes nothing."""
        if not self.has_published():
            raise CLAgentError(f"no model {self.model_name!r} in {self.root} to hold ({self.models_there()})")
        with self._lock():
            existing = self.publishing_hold()
            if existing is not None and not replace:
                return existing, existing
            hold = PublishingHold(
                self.hold_path, held_by=_operator(), held_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), reason=reason or None
            )
            body = {"model": self.model_name, "held_by": hold.held_by, "held_at": hold.held_at, "reason": hold.reason}
            atomic_write_text(self.hold_path, json.dumps(body, indent=2) + "\n", FILE_MODE)
        if existing is not None:
            log.info("publishing of %s held (%s), replacing the hold %s", self.model_name, hold.describe(), existing.describe())
        else:
            log.info("publishing of %s held (%s)", self.model_name, hold.describe())
        return hold, existing

    def release(self) -> PublishingHold | None:
        """Lift the hold on publishing; returns the hold removed (None if there was none, and then nothing is written)."""
        if self.publishing_hold() is None:  # no marker: no lock taken, so no folder or lock file is made
            return None
        with self._lock():
            hold = self.publishing_hold()
            if hold is None:
                return None
            self.hold_path.unlink()
            fsync_dir(self.model_dir)
        log.info("publishing of %s released (was held %s)", self.model_name, hold.describe())
        return hold

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        _make_public_dir(self.model_dir)
        with open(self.model_dir / LOCK_FILE, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def publish(
        self, onnx_path: str | os.PathLike, manifest: dict, optimized: OptimizedModel | None = None, after: int = 0,
        honour_hold: bool = False,
    ) -> int:
        """Publish a copy of ``onnx_path`` as a new version; returns the version number.

        ``honour_hold``: raise ``PublishingHeld`` (publishing nothing) while the model is held.
        Checked under the publish lock, so nothing published this way lands after a hold is
        in place (the agent's updates pass it; a rollback from the command line does not).

        The number is one past the highest ever published here, and past ``after``: a publisher
        that remembers its own last version (the agent's records) never reuses a number, also
        when the repository folder was deleted or replaced.

        ``manifest`` must hold ``class_names`` (output order) and ``image_size``;
        ``experience_index``, ``metrics``, ``export`` and anything else are kept.
        ``version``, ``sha256``, ``created_at``, ``parent_version`` and ``input``
        are filled in here, and ``optimized`` (file, sha256, environment) when an
        optimised graph is published alongside.
        """
        onnx_path = Path(onnx_path)
        if not onnx_path.is_file():
            raise CLAgentError(f"cannot publish {onnx_path}: no such file")
        if optimized is not None and not Path(optimized.path).is_file():
            raise CLAgentError(f"cannot publish the optimised graph {optimized.path}: no such file")
        if optimized is not None and optimized.data_path.is_file() and Path(optimized.path).name != OPTIMIZED_FILE:
            # The graph names its weights file; renaming the pair here would break that reference.
            raise CLAgentError(
                f"cannot publish the optimised graph {optimized.path}: with a weights file beside it "
                f"({optimized.data_path.name}) it must be named {OPTIMIZED_FILE}"
            )
        missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
        if missing:
            raise CLAgentError(f"manifest is missing {', '.join(missing)} (got keys: {', '.join(sorted(manifest))})")
        size = manifest["image_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise CLAgentError(f"manifest image_size must be a positive int, got {size!r}")
        names = manifest["class_names"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise CLAgentError(f"manifest class_names must be a non-empty list of strings, got {names!r:.200}")
        with self._lock():
            hold = self.publishing_hold() if honour_hold else None
            if hold is not None:
                raise PublishingHeld(hold)
            version = max(self.last_version_ever(), after) + 1
            temp = self.model_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
            temp.mkdir()
            os.chmod(temp, DIR_MODE)
            try:
                digest = _copy_hashed(onnx_path, temp / MODEL_FILE, self.pause_s)
                extra = {}
                if optimized is not None:
                    extra["optimized"] = {
                        "file": OPTIMIZED_FILE,
                        "sha256": _copy_hashed(Path(optimized.path), temp / OPTIMIZED_FILE, self.pause_s),
                        "environment": dict(optimized.environment),
                    }
                    if optimized.data_path.is_file():
                        extra["optimized"]["data_file"] = OPTIMIZED_DATA_FILE
                        extra["optimized"]["data_sha256"] = _copy_hashed(optimized.data_path, temp / OPTIMIZED_DATA_FILE, self.pause_s)
                full = {
                    "model": self.model_name,
                    "version": version,
                    "parent_version": self.latest_version(),
                    "class_names": list(names),
                    "input": {"name": "images", "dtype": "uint8", "shape": [-1, size, size, 3], "layout": "NHWC", "color": "RGB"},
                    "outputs": ["logits", "probs"],
                    "experience_index": None,
                    "metrics": {},
                    **{k: v for k, v in manifest.items() if k != "optimized"},  # only a file published here is named
                    **extra,
                    "sha256": digest,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                }
                full["version"] = version
                atomic_write_text(temp / MANIFEST_FILE, json.dumps(full, indent=2, sort_keys=True) + "\n", FILE_MODE)
                fsync_dir(temp)
                self._commit(temp, version, size, len(names))
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
            self._apply_retention()
        log.info("published %s version %d (%s)", self.model_name, version, full["sha256"][:12])
        return version

    def install(self, version: int, model_path: str | os.PathLike, manifest: dict) -> int:
        """Add a copy of another repository's ``version`` under the same number (a follower's mirror).

        ``manifest`` is the source's manifest, kept as it is; the copy's sha256 must
        match ``manifest["sha256"]``. Written atomically like ``publish``. Refuses a
        version at or below the highest this repository ever had, so versions only
        increase here too; the counter follows the installed number.
        """
        model_path = Path(model_path)
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise CLAgentError(f"cannot install version {version!r}: versions are ints >= 1")
        if not model_path.is_file():
            raise CLAgentError(f"cannot install {model_path}: no such file")
        if not isinstance(manifest, dict) or manifest.get("version") != version:
            raise CLAgentError(f"the manifest does not describe version {version}: {str(manifest)[:200]}")
        missing = [k for k in (*REQUIRED_MANIFEST_KEYS, "sha256") if k not in manifest]
        if missing:
            raise CLAgentError(f"manifest of version {version} is missing {', '.join(missing)}")
        with self._lock():
            newest = self.last_version_ever()
            if version <= newest:
                raise CLAgentError(f"cannot install version {version} of {self.model_name!r}: this repository already reached {newest}")
            temp = self.model_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
            temp.mkdir()
            os.chmod(temp, DIR_MODE)
            try:
                digest = _copy_hashed(model_path, temp / MODEL_FILE, self.pause_s)
                if digest != manifest["sha256"]:
                    raise CLAgentError(
                        f"cannot install version {version}: {model_path} has sha256 {digest[:12]}..., "
                        f"the manifest says {str(manifest['sha256'])[:12]}..."
                    )
                atomic_write_text(temp / MANIFEST_FILE, json.dumps(manifest, indent=2, sort_keys=True) + "\n", FILE_MODE)
                fsync_dir(temp)
                self._commit(temp, version, int(manifest["image_size"]), len(manifest["class_names"]))
            except BaseException:
                shutil.rmtree(temp, ignore_errors=True)
                raise
            self._apply_retention()
        log.info("installed %s version %d (%s)", self.model_name, version, digest[:12])
        return version

    def _commit(self, temp: Path, version: int, image_size: int, num_classes: int) -> None:
        """Make a complete, fsynced temp folder version ``version``: counter, Triton config, then the rename."""
        # The counter goes first: if we crash after it, a number is skipped, never reused.
        atomic_write_text(self.model_dir / COUNTER_FILE, f"{version}\n", FILE_MODE)
        atomic_write_text(self.model_dir / CONFIG_FILE, triton_config(self.model_name, image_size, num_classes), FILE_MODE)
        os.rename(temp, self.version_dir(version))
        try:
            fsync_dir(self.model_dir)
        except OSError as e:
            # The version is in place and servers may load it already: it is published, only
            # whether the rename survives a power cut is in doubt (its number is never reused).
            log.warning("version %d is in place, but %s could not be fsynced (%s): a power cut may still lose it", version, self.model_dir, e)

    def _apply_retention(self) -> None:
        """Keep the newest ``keep_last`` versions; rename a folder away before deleting it.

        Runs after a version is in place, so a failure here (say, a folder a person made
        read-only) is logged, not raised: the new version is published all the same, and
        the next publish tries again.
        """
        try:
            doomed = self.versions()[: -self.keep_last]  # folders that are not versions are left for a person to look at
            for version in doomed:
                trash = self.model_dir / f".deleted-{version}-{uuid.uuid4().hex[:8]}"  # DELETED_NAME
                os.rename(self.version_dir(version), trash)
                shutil.rmtree(trash, ignore_errors=True)
            # Leftovers of deletes that a kill or an error cut short, and of publishers killed before their
            # rename: both are made and removed under the publish lock held here, so one seen now is never
            # in use. Only the names this code makes (a person's folders stay).
            for left in [*self.model_dir.glob(".deleted-*"), *self.model_dir.glob(".tmp-*")]:
                if (DELETED_NAME.fullmatch(left.name) or TEMP_NAME.fullmatch(left.name)) and left.is_dir() \
                        and not left.is_symlink():
                    shutil.rmtree(left, ignore_errors=True)
            if doomed:
                fsync_dir(self.model_dir)
        except OSError as e:
            log.warning("%s: could not remove old versions (%s); keeping them until the next publish", self.model_dir, e)

    def rollback(self, to: int, hold_reason: str | None = None, announced: bool | None = None) -> int:
        """Republish version ``to`` as a new, higher version (so every server moves to it).

        With ``hold_reason``, publishing is held first (``hold``; a hold already there is kept), so
        no update of the agent can be published after the rollback; the hold stays if the republish
        then fails. ``announced``: whether the new version will be announced, recorded in its
        manifest (``False`` tells followers that finding it by polling is expected); None records nothing."""
        manifest = self.verify(to)
        if hold_reason is not None:
            self.hold(hold_reason)
        carried = {k: v for k, v in manifest.items() if k not in ("version", "sha256", "created_at", "parent_version", "announced")}
        carried["rollback_of"] = to
        if announced is not None:
            carried["announced"] = bool(announced)
        return self.publish(self.model_path(to), carried, self._verified_optimized(to, manifest))

    def _verified_optimized(self, version: int, manifest: dict) -> OptimizedModel | None:
        """The optimised graph of ``version`` if its manifest names one and its files match their sha256."""
        entry = manifest.get("optimized")
        if not isinstance(entry, dict):
            return None
        for path, why in mismatched_files(optimized_files(self.version_dir(version), entry), self.pause_s).items():
            log.warning("%s: %s: not carried over (servers will use %s)", path, why or "missing", MODEL_FILE)
            return None
        return OptimizedModel(self.version_dir(version) / OPTIMIZED_FILE, dict(entry.get("environment") or {}))


class Announcer:
    """ZeroMQ PUB socket announcing published versions.

    Message: two frames, the model name (the subscription topic) and a JSON
    object ``{"model", "version", "sha256"}``. Subscribers that miss one (PUB
    drops messages to peers still connecting) find the version by polling.
    """

    def __init__(self, endpoint: str, context=None):
        import zmq

        self._context = context or zmq.Context.instance()
        self.socket = self._context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 500)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as e:
            self.socket.close(0)
            raise bind_failure(f"cannot bind the announce endpoint {endpoint}", e) from None
        self.endpoint = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def announce(self, model: str, version: int, sha256: str) -> None:
        body = json.dumps({"model": model, "version": int(version), "sha256": sha256})
        self.socket.send_multipart([model.encode(), body.encode()])

    def close(self) -> None:
        self.socket.close()


def parse_announcement(frames: list[bytes]) -> dict:
    """Decode an Announcer message; raises ValueError on anything malformed."""
    if len(frames) != 2:
        raise ValueError(f"announcement must have 2 frames, got {len(frames)}")
    body = json.loads(frames[1])
    if not isinstance(body, dict) or not isinstance(body.get("version"), int) or not isinstance(body.get("sha256"), str):
        raise ValueError(f"announcement body lacks an int version and a sha256: {body!r:.200}")
    return body


# --------------------------------------------------------------------------- command line


def check_repo_option(repo: str | os.PathLike, option: str = "--repo") -> None:
    """CLAgentError naming ``option`` (``--repo``, or ``repository.root`` when it came from a config) unless
    ``repo`` is a folder that can be read: the ``models`` commands say so rather than report a mistyped
    path as a repository without versions."""
    path = Path(repo)
    where = f"{option} = {str(path)!r}"
    if not path.exists():
        hint = ": pass --repo DIR (the agent's repository.root) or --config FILE (the agent's config)" \
            if option.startswith("the default") else ""
        raise CLAgentError(f"{where}: folder not found{hint}")
    if not path.is_dir():
        raise CLAgentError(f"{where}: not a folder")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CLAgentError(f"{where}: the folder is not readable")


def release_hint(repo: str | os.PathLike, model: str) -> str:
    """The command that lifts a hold on ``model`` in ``repo``."""
    return f"`cl-agent models release --repo {repo} --model {model}`"


def print_hold(repo: str | os.PathLike, model: str, hold: PublishingHold) -> None:
    import typer

    typer.echo(f"publishing held {hold.describe()} ({hold.path}); {release_hint(repo, model)} to resume")


def print_versions(repo: str | os.PathLike, model: str, option: str = "--repo") -> int:
    """``cl-agent models list``: one line per version, then the hold on publishing if there is one;
    exit code 0, or 1 if there is no version."""
    import typer

    check_repo_option(repo, option)
    repository = ModelRepository(repo, model)
    versions = repository.versions()
    hold = repository.publishing_hold()
    if not versions:
        typer.echo(f"no versions of {model!r} in {repo}{repository._absent_note()}")
        if hold is not None:
            print_hold(repo, model, hold)
        return 1
    from cl_agent.labels import names_from_manifest

    # classes: those the version has ids for (named, in the label map) / its outputs (model.num_classes; the
    # outputs no class was given yet carry their index as a placeholder name in the manifest).
    typer.echo(f"{'version':>7}  {'created (UTC)':<23}  {'exp':>4}  {'classes':>7}  {'parent':>6}  sha256        note")
    for version in versions:
        try:
            m = repository.load_manifest(version)
            problem = manifest_problem(m)
        except CLAgentError as e:  # one broken version must not hide the others
            problem = str(e)
        if problem:
            where = repository.version_dir(version) / MANIFEST_FILE
            typer.echo(f"warning: version {version} of {model!r} is listed as unreadable ({where}): {problem}", err=True)
            typer.echo(f"{version:>7}  {'-':<23}  {'-':>4}  {'-':>7}  {'-':>6}  {'-':<12}  unreadable manifest: {problem:.160}")
            continue
        note = f"rollback of {m['rollback_of']}" if m.get("rollback_of") is not None else ""
        exp = m.get("experience_index")
        names = m["class_names"]
        classes = f"{len(names_from_manifest(names))}/{len(names)}"
        typer.echo(
            f"{version:>7}  {str(m.get('created_at', ''))[:23]:<23}  {'-' if exp is None else exp:>4}  "
            f"{classes:>7}  {str(m.get('parent_version') or '-'):>6}  "
            f"{str(m.get('sha256', ''))[:12]}  {note}"
        )
    if hold is not None:
        print_hold(repo, model, hold)
    return 0


def hold_publishing(repo: str | os.PathLike, model: str, reason: str | None, option: str = "--repo", replace: bool = False) -> int:
    """``cl-agent models hold``: stop the agent publishing ``model`` (it goes on training); exit code 0.

    A hold already there is kept and reported (who, since when, why), unless ``replace``: then
    the new one replaces it and the replaced one is printed."""
    import typer

    check_repo_option(repo, option)
    hold, before = ModelRepository(repo, model).hold(reason, replace=replace)
    if before is not None and not replace:
        typer.echo(f"publishing of {model!r} was already held {before.describe()} ({before.path}); that hold is kept "
                   f"(--replace replaces it); {release_hint(repo, model)} to resume")
        return 0
    if before is not None:
        typer.echo(f"replaced the hold on {model!r} that was held {before.describe()}")
    typer.echo(f"publishing of {model!r} held ({hold.path}); the agent keeps training; {release_hint(repo, model)} to resume")
    return 0


def release_publishing(repo: str | os.PathLike, model: str, option: str = "--repo") -> int:
    """``cl-agent models release``: lift the hold; a running agent publishes the checkpoint the hold kept back within
    about a second (a stopped one at its next start). Exit code 0, or 1 if there was none."""
    import typer

    check_repo_option(repo, option)
    repository = ModelRepository(repo, model)
    hold = repository.release()
    if hold is None:
        absent = "" if repository.has_published() else f" (no model {model!r} there; {repository.models_there()})"
        typer.echo(f"publishing of {model!r} in {repo} was not held{absent}")
        return 1
    typer.echo(
        f"publishing of {model!r} released (was held {hold.describe()}): a running agent publishes the checkpoint "
        "the hold kept back within about a second (a stopped one at its next start); if it trained nothing while "
        "held, its next update publishes"
    )
    return 0


def print_manifest(repo: str | os.PathLike, model: str, version: int | None, option: str = "--repo") -> int:
    """``cl-agent models show``: the manifest of ``version`` (default: the newest) as JSON; exit code 0."""
    import typer

    check_repo_option(repo, option)
    _, manifest = ModelRepository(repo, model).chosen_manifest(version)
    typer.echo(json.dumps(manifest, indent=2, sort_keys=True))
    return 0


def check_files(repository: ModelRepository, version: int) -> tuple[list[str], list[str]]:
    """(problems, notes) of ``version``'s files against its manifest: missing or altered files are problems.

    An optimised graph the manifest names but that is not there is only a note: a follower
    installs ``model.onnx`` alone, and servers then open that.
    """
    try:
        manifest = repository.load_manifest(version)
    except CLAgentError as e:
        return [str(e)], []
    problem = manifest_problem(manifest)
    if problem:
        return [problem], []
    model = repository.model_path(version)
    files: dict[Path, object] = {model: manifest["sha256"]}
    entry = manifest.get("optimized")
    if isinstance(entry, dict):
        files.update(optimized_files(repository.version_dir(version), entry))
    problems, notes = [], []
    for path, why in mismatched_files(files).items():
        if why:
            problems.append(f"{path.name}: {why}")
        elif path == model:
            problems.append(f"{path.name} is missing")
        elif not notes:
            notes.append(f"no optimised graph here (servers open {model.name})")
    return problems, notes


def verify_versions(repo: str | os.PathLike, model: str, option: str = "--repo") -> int:
    """``cl-agent models verify``: check every version's files against its manifest; exit code 0 if all match, else 1."""
    import typer

    check_repo_option(repo, option)
    repository = ModelRepository(repo, model)
    versions = repository._numbered_dirs()  # incomplete ones too: a published version that lost a file shows here
    if not versions:
        raise CLAgentError(f"no versions of {model!r} in {repo}{repository._absent_note()}")
    bad = 0
    for version in versions:
        folder = repository.version_dir(version)
        missing = [name for name in (MODEL_FILE, MANIFEST_FILE) if not (folder / name).is_file()]
        if missing:
            problems, notes = [f"{' and '.join(missing)} missing (not a version any more: servers skip this folder)"], []
        else:
            problems, notes = check_files(repository, version)
        bad += bool(problems)
        typer.echo(f"version {version}: " + ("; ".join(problems) if problems else " ".join(["ok", *(f"({n})" for n in notes)])))
    if bad:
        typer.echo(
            f"{bad} of {len(versions)} versions of {model!r} do not match their manifests: servers refuse them "
            "(an optimised graph that does not match is skipped for model.onnx); republish with "
            "`cl-agent models rollback --to` a version that is ok",
            err=True,
        )
    return 1 if bad else 0


def rollback(
    repo: str | os.PathLike, model: str, to: int, announce_endpoint: str | None = None,
    hold: bool = False, reason: str | None = None, option: str = "--repo",
) -> int:
    """``cl-agent models rollback``: republish ``to`` as a new version, optionally announce it; exit code 0.

    ``hold``: hold publishing first (``reason``, default "rolled back to version <to>"), so the
    agent's next update does not replace the rolled-back model."""
    import typer

    check_repo_option(repo, option)
    if announce_endpoint is not None:  # checked before anything is published: a typo must not leave a rollback unannounced
        from cl_agent.config import endpoint_problem

        problem = endpoint_problem(announce_endpoint)
        if problem:
            raise CLAgentError(f"--announce = {announce_endpoint!r}: {problem}")
    # Retention is the publisher's business (its config); a rollback from the command line deletes nothing.
    existing = ModelRepository(repo, model).versions()
    repository = ModelRepository(repo, model, keep_last=max(1, len(existing) + 1))
    held_before = repository.publishing_hold() if hold else None
    # The endpoint is bound before the republish, so the manifest can say whether the version is announced:
    # a follower that finds an unannounced one by polling then knows that is expected.
    announcer, unbound = None, None
    if announce_endpoint is not None:
        try:
            announcer = Announcer(announce_endpoint)
        except CLAgentError as e:  # e.g. the running agent holds the endpoint: servers still find it by polling
            unbound = e
    try:
        version = repository.rollback(
            to, hold_reason=(reason or f"rolled back to version {to}") if hold else None, announced=announcer is not None
        )
        typer.echo(f"rolled {model!r} back to version {to}: published as version {version}")
        held = repository.publishing_hold()
        if held is not None:
            kept = " (it was held before the rollback; that hold is kept)" if held_before is not None else ""
            typer.echo(f"publishing stays held {held.describe()}{kept}: the agent trains on but publishes nothing; "
                       f"{release_hint(repo, model)} to resume")
        else:
            typer.echo(f"note: an agent publishing {model!r} replaces version {version} at its next update; "
                       "`cl-agent models hold` (or rollback --hold) keeps it served")
        if unbound is not None:
            typer.echo(f"warning: not announced ({unbound}); servers pick version {version} up at their next poll", err=True)
        if announcer is not None:
            # Give subscribers a moment to (re)connect to the new PUB socket; pollers catch up anyway.
            time.sleep(0.5)
            announcer.announce(model, version, repository.load_manifest(version)["sha256"])
    finally:
        if announcer is not None:
            announcer.close()
    return 0
