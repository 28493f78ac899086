"""Experiences: when to cut one (the policy) and where they live (the store).

An experience is the labeled samples that arrived since the previous cut plus a
draw of unlabeled frames from the reservoir, numbered 0, 1, 2, ... and durable.
Layout under the working directory:

    spool/labeled-000007.log        labeled records of experience 7 (see spool.py)
    experiences/000007/unlabeled.log  the unlabeled draw (same record format, labels empty)
    experiences/000007/meta.json    written last, atomically: its presence means "cut"
    experiences/000007/trained      marker written by mark_trained
    experiences/000007/pruned       marker: its data (segment and draw) was deleted by retention (retention.py)
    experiences/keys.json           the (sender, seq) keys of experiences 0..N as runs, rewritten after each cut

Numbering continues after a restart: the next experience is one past the
highest ``meta.json``. The store is read through files only, so a trainer in
another thread or process can use its own ``ExperienceStore`` on the same folder.
"""

from __future__ import annotations

import json
import logging
import os
from bisect import bisect_left
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cl_agent.config import ExperienceSection, WireSection
from cl_agent.errors import CLAgentError
from cl_agent.keyset import KeySet
from cl_agent.reservoir import Frame
from cl_agent.spool import Record, read_records
from cl_agent.storage import atomic_write_bytes, atomic_write_text, fsync_dir
from cl_agent.codec import WireError, check_size, decode_image, image_dimensions

log = logging.getLogger(__name__)

CUT_COUNT, CUT_TIME, CUT_EXPLICIT = "count", "time", "explicit"
CUT_FULL = "spool_full"  # the open experience alone filled the spool: only training it can free space
UNLABELED_FILE = "unlabeled.log"
PRUNED_MARKER = "pruned"
KEYS_SUMMARY = "keys.json"
# The size limits a stored image is decoded under when the caller has no config (decode_sample's and
# Experience.decode's default). The trainer passes the configured ingest.wire, the limits the labeled
# intake checks images against, so that an acked image is one the trainer decodes.
STORED_IMAGE_LIMITS = WireSection()
NAMED_DROPS = 5  # dropped labeled images named in the warning; the rest are counted


class UnreadableExperience(CLAgentError):
    """A cut experience whose data cannot be read back: its spool segment or unlabeled draw is missing or
    unreadable, or the segment does not hold the labeled samples its meta.json counts. The message names the file."""

    def __init__(self, index: int, message: str):
        super().__init__(message)
        self.index = index


class ExperiencePolicy:
    """Decides when the open experience is cut: count, time with a minimum, or an explicit end."""

    def __init__(self, config: ExperienceSection):
        self.config = config
        self._clamped: tuple[float, float] | None = None  # (a first sample time seen later than now, the now it was seen at)

    def reason_to_cut(self, samples: int, first_sample_ts: float | None, now: float | None = None) -> str | None:
        if samples >= self.config.labeled_samples:
            return CUT_COUNT
        now = time.time() if now is None else now
        if (
            first_sample_ts is not None
            and samples >= self.config.min_samples
            and now - self._wait_start(first_sample_ts, now) >= self.config.max_wait_s
        ):
            return CUT_TIME
        return None

    def _wait_start(self, first_sample_ts: float, now: float) -> float:
        """When the wait for a time cut began: the first sample's arrival (wall clock), or, when that is
        later than now (stamped before the clock stepped back), the moment it was first seen so: the wait
        starts over once instead of lasting until the clock catches up."""
        clamped = self._clamped
        start = clamped[1] if clamped is not None and clamped[0] == first_sample_ts else first_sample_ts
        if start > now:
            start = now
            self._clamped = (first_sample_ts, now)
        return start


@dataclass
class Sample:
    """One still-encoded image."""

    payload: bytes
    encoding: str
    shape: tuple[int, int, int]
    color: str = "rgb"
    sender: str = ""  # of the message that carried it (a frame's source for unlabeled samples)
    seq: int | None = None  # that message's seq (labeled samples only: an unlabeled record's seq is its draw index)
    position: int = 0  # index of the image in its message


def decode_sample(sample: Sample, image_size: int, limits: WireSection | None = None) -> np.ndarray:
    """Decode to uint8 (S, S, 3) RGB. Large JPEG/PNG images are decoded at a reduced scale when that still covers S."""
    import cv2

    limits = limits or STORED_IMAGE_LIMITS
    if sample.encoding == "raw":
        image = decode_image(sample.payload, "raw", limits, shape=sample.shape, color=sample.color)
    else:
        height, width, _ = image_dimensions(sample.payload, sample.encoding)
        check_size(height, width, limits, "stored image")
        flag = cv2.IMREAD_COLOR
        if sample.encoding == "jpeg":
            # JPEG can decode at 1/2, 1/4, 1/8 scale for a fraction of the cost.
            for factor, reduced in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2)):
                if min(height, width) >= factor * image_size:
                    flag = reduced
                    break
        bgr = cv2.imdecode(np.frombuffer(sample.payload, dtype=np.uint8), flag)
        if bgr is None:
            raise WireError("decode_failed", f"stored {sample.encoding} image could not be decoded")
        image = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    if image.shape[:2] != (image_size, image_size):
        shrinking = image.shape[0] > image_size or image.shape[1] > image_size
        image = cv2.resize(image, (image_size, image_size), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    return image


@dataclass
class Experience:
    """A cut experience: labeled samples with int class ids and unlabeled frames, all still encoded."""

    index: int
    labeled: list[Sample]
    labels: np.ndarray  # int64 (N,)
    unlabeled: list[Sample]
    meta: dict = field(default_factory=dict)

    def decode(self, image_size: int, limits: WireSection | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(labeled uint8 (N, S, S, 3), labels int64 (N,), unlabeled uint8 (M, S, S, 3)).

        ``limits``: the size limits images are decoded under; pass the configured ``ingest.wire``
        (the ones ingest accepted them under). None: the default ``STORED_IMAGE_LIMITS``.
        Unreadable images (acked at ingest, undecodable now) are skipped; one warning
        per experience gives how many of each kind were dropped.
        """
        labeled, labels = [], []
        dropped_labeled = dropped_unlabeled = 0
        reasons: set[str] = set()
        named: list[str] = []  # which labeled images: sender, seq and index in the message
        for sample, label in zip(self.labeled, self.labels):
            try:
                labeled.append(decode_sample(sample, image_size, limits))
                labels.append(label)
            except WireError as e:
                dropped_labeled += 1
                reasons.add(e.reason)
                if len(named) < NAMED_DROPS:
                    named.append(f"{sample.sender} seq {sample.seq} image {sample.position} ({e.reason})")
        unlabeled = []
        for sample in self.unlabeled:
            try:
                unlabeled.append(decode_sample(sample, image_size, limits))
            except WireError as e:
                dropped_unlabeled += 1
                reasons.add(e.reason)
        if dropped_labeled or dropped_unlabeled:
            more = dropped_labeled - len(named)
            which = f"; labeled: {', '.join(named)}" + (f" and {more} more" if more > 0 else "") if named else ""
            log.warning(
                "experience %d: dropped %d labeled and %d unlabeled images that could not be decoded (%s)%s",
                self.index,
                dropped_labeled,
                dropped_unlabeled,
                ", ".join(sorted(reasons)),
                which,
                extra={"experience": self.index, "dropped_labeled": dropped_labeled, "dropped_unlabeled": dropped_unlabeled},
            )
        empty = np.zeros((0, image_size, image_size, 3), np.uint8)
        return (
            np.stack(labeled) if labeled else empty,
            np.asarray(labels, dtype=np.int64),
            np.stack(unlabeled) if unlabeled else empty.copy(),
        )


def _samples(records: Sequence[Record], *, labeled: bool = True) -> tuple[list[Sample], list[int]]:
    samples, labels = [], []
    for record in records:
        seq = record.seq if labeled else None
        for position, (payload, shape, label) in enumerate(
            zip(record.payloads, record.shapes, record.labels or [None] * len(record.payloads))
        ):
            samples.append(Sample(payload, record.encoding, tuple(shape), record.color, record.sender, seq, position))
            labels.append(label)
    return samples, labels


def _is_number(name: str) -> bool:
    """Whether ``name`` is an experience folder's: ASCII digits (``str.isdigit`` also takes "²", which ``int`` refuses)."""
    return name.isascii() and name.isdigit()


def _read_samples(index: int, path: Path, *, labeled: bool = True) -> tuple[list[Sample], list[int]]:
    """The samples of one file of experience ``index``; ``UnreadableExperience`` naming it if it cannot be read."""
    try:
        return _samples([r for _, r in read_records(path)], labeled=labeled)
    except OSError as e:
        raise UnreadableExperience(index, f"experience {index}: cannot read {path}: {e.strerror or e}") from None
    except ValueError as e:  # a record whose checksum holds but whose header does not parse
        raise UnreadableExperience(index, f"experience {index}: cannot read {path}: {e}") from None


class ExperienceStore:
    def __init__(self, workdir: str | Path):
        self.workdir = Path(workdir)
        self.root = self.workdir / "experiences"
        self.spool_dir = self.workdir / "spool"
        # What pending() has seen: the experiences not yet trained, and where new ones would appear.
        self._untrained: set[int] | None = None
        self._next_index = 0
        self._listed: set[int] = set()  # the experience folder names at the last listing (numbers)
        self._root_mtime: int | None = None  # experiences/ changed since that listing when this does
        self._pending_lock = threading.Lock()  # the agent's loop and the ingest thread share a store

    def experience_dir(self, index: int) -> Path:
        return self.root / f"{index:06d}"

    def indices(self) -> list[int]:
        """Every cut experience, in order."""
        if not self.root.is_dir():
            return []
        return sorted(int(p.name) for p in self.root.iterdir() if _is_number(p.name) and (p / "meta.json").exists())

    @property
    def last_index(self) -> int:
        """The highest cut experience, -1 if none."""
        found = self.indices()
        return found[-1] if found else -1

    def pending(self, listed: Sequence[int] | None = None) -> list[int]:
        """Cut, durable, not yet trained; in order.

        Polled about twice a second by the agent and by the trainer, so only the first call
        scans the store. Later calls look above the newest experience seen (the ingest process
        cuts them in order, each one past the last) and at those still untrained: a trained
        mark is never taken back, so a poll costs the same after ten experiences or a hundred
        thousand. Another process's cuts and marks are seen, as is a folder a person moved away,
        or back: when the folder ``experiences/`` changed (its modification time, one stat a
        poll), its names are listed, without reading inside, and a name not there at the last
        listing and below the newest is looked at. ``listed``: the cut experiences
        (``indices()``) when the caller has just listed them, for the first call.
        """
        with self._pending_lock:
            if self._untrained is None:
                self._root_mtime = self._root_mtime_ns()  # before listing: a change during it is seen next time
                found = self.indices() if listed is None else list(listed)
                self._untrained = {i for i in found if not self.is_trained(i)}
                self._next_index = found[-1] + 1 if found else 0
                self._listed = set(found)
            else:
                self._look_for_returned()
            while (self.experience_dir(self._next_index) / "meta.json").exists():
                self._untrained.add(self._next_index)
                self._next_index += 1
            for index in list(self._untrained):
                if self.is_trained(index) or not (self.experience_dir(index) / "meta.json").exists():
                    self._untrained.discard(index)
            return sorted(self._untrained)

    def _root_mtime_ns(self) -> int | None:
        try:
            return self.root.stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _look_for_returned(self) -> None:
        """Folders put back (or in) below the newest experience since the last listing join the untrained."""
        mtime = self._root_mtime_ns()
        if mtime == self._root_mtime:
            return
        self._root_mtime = mtime
        names = {int(n) for n in os.listdir(self.root) if _is_number(n)} if mtime is not None else set()
        for index in names - self._listed:
            if index < self._next_index and (self.experience_dir(index) / "meta.json").exists() and not self.is_trained(index):
                self._untrained.add(index)
        self._listed = names

    def is_trained(self, index: int) -> bool:
        return (self.experience_dir(index) / "trained").exists()

    def is_pruned(self, index: int) -> bool:
        """Its data was deleted by retention (spool.keep_trained_bytes); the meta and the trained marker stay."""
        return (self.experience_dir(index) / PRUNED_MARKER).exists()

    def meta(self, index: int) -> dict:
        path = self.experience_dir(index) / "meta.json"
        if not path.exists():
            raise KeyError(f"experience {index} has not been cut (no {path})")
        try:
            meta = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # written atomically: damaged by hand or disk
            raise CLAgentError(f"cannot read {path}: {e} (restore it, or move experience folder {path.parent.name} away)") from None
        if not isinstance(meta, dict):
            raise CLAgentError(f"{path} is not a JSON object")
        return meta

    def load(self, index: int) -> Experience:
        """Read a cut experience back; raises ``UnreadableExperience`` naming the file when its labeled
        segment or its unlabeled draw is missing or unreadable, or the segment does not hold the labeled
        samples its meta.json counts."""
        meta = self.meta(index)
        if self.is_pruned(index):
            raise CLAgentError(
                f"experience {index} was trained and its data deleted to keep the disk bounded "
                "(spool.keep_trained_bytes; -1 keeps all)"
            )
        segment = self.spool_dir / meta["labeled_segment"]
        labeled, labels = _read_samples(index, segment)
        unlabeled, _ = _read_samples(index, self.experience_dir(index) / UNLABELED_FILE, labeled=False)
        if len(labeled) != meta["labeled_samples"]:
            raise UnreadableExperience(
                index,
                f"experience {index}: {segment} holds {len(labeled)} labeled samples, its meta.json says "
                f"{meta['labeled_samples']} (the segment was damaged or truncated)",
            )
        return Experience(index, labeled, np.asarray(labels, dtype=np.int64), unlabeled, meta)

    def mark_trained(self, index: int) -> None:
        self.meta(index)  # raises if not cut
        atomic_write_text(self.experience_dir(index) / "trained", f"{time.time()}\n")

    def write(
        self,
        index: int,
        *,
        labeled_segment: str,
        labeled_samples: int,
        keys: Sequence[tuple[str, int]],
        unlabeled: Sequence[Frame],
        reason: str,
        classes: Sequence[int] = (),
    ) -> Path:
        """Make experience ``index`` durable: the unlabeled draw first, the meta last (atomic)."""
        directory = self.experience_dir(index)
        directory.mkdir(parents=True, exist_ok=True)
        body = b"".join(
            Record(f.source or "frames", i, f.encoding, [f.shape], [], [f.payload], f.color).to_bytes()
            for i, f in enumerate(unlabeled)
        )
        atomic_write_bytes(directory / UNLABELED_FILE, body)
        meta = {
            "index": index,
            "labeled_segment": labeled_segment,
            "labeled_samples": labeled_samples,
            "unlabeled_samples": len(unlabeled),
            "classes": sorted(set(int(c) for c in classes)),
            "cut_reason": reason,
            "cut_at": time.time(),
            "keys": [list(k) for k in keys],
        }
        atomic_write_text(directory / "meta.json", json.dumps(meta))
        fsync_dir(self.root)
        return directory

    def committed_keys(self, indices: Sequence[int] | None = None) -> KeySet:
        """(sender, seq) of every labeled message in a cut experience (for idempotency across restarts).

        ``indices``: the cut experiences, in order, when the caller has just listed them (``indices()``).
        Starts from the summary ``save_keys`` left (``keys.json``) and reads the ``meta.json`` of
        only the experiences cut after it, so a start does not read every experience ever cut.
        Without a usable summary (none yet, damaged, or its last experience moved away) every
        ``meta.json`` is read, as the summary is only a shortcut to what they hold.
        """
        indices = self.indices() if indices is None else indices
        keys, through = self._keys_summary(indices)
        for index in indices:
            if index > through:
                keys.update((s, q) for s, q in self.meta(index)["keys"])
        return keys

    def save_keys(self, through: int, keys: KeySet) -> None:
        """Record ``keys``, the keys of every cut experience up to ``through`` and of no other, as runs."""
        atomic_write_text(self.root / KEYS_SUMMARY, json.dumps({"through": through, "runs": keys.to_runs()}, separators=(",", ":")))

    def discard_unfinished_writes(self) -> int:
        """Delete what a process killed while rewriting the key summary left (its temp files); returns how many.

        Only the one writer of the store (the ingest process) may call it, before it writes."""
        removed = 0
        for path in self.root.glob(f".{KEYS_SUMMARY}.*.tmp") if self.root.is_dir() else ():
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def _keys_summary(self, indices: Sequence[int]) -> tuple[KeySet, int]:
        path = self.root / KEYS_SUMMARY
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
            through = summary["through"]
            if type(through) is not int:
                raise ValueError(f"through must be an integer, got {through!r}")
            i = bisect_left(indices, through)
            if i == len(indices) or indices[i] != through:
                raise ValueError(f"experience {through}, the last it covers, is not in the store")
            return KeySet.from_runs(summary["runs"]), through
        except FileNotFoundError:
            return KeySet(), -1
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            log.warning("not using %s (%s: %s); reading the keys of every experience instead", path, type(e).__name__, e)
            return KeySet(), -1

    def segment_bytes(self, index: int) -> int:
        """Bytes of experience ``index``'s labeled segment in the spool (0 if the file is gone)."""
        path = self.spool_dir / self.meta(index)["labeled_segment"]
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0


class UntrainedBytes:
    """Running total of the labeled-segment bytes of cut, untrained experiences: what counts against spool.max_bytes.

    Built with one scan of the store. Afterwards the ingest process ``add``s each experience it
    cuts, and ``refresh`` looks only at the experiences it still holds as untrained, one stat of
    the trainer's ``trained`` marker each, subtracting those newly marked. The trainer (another
    thread or process) needs to do nothing more than ``mark_trained``. So a refresh costs one stat
    per experience waiting for training (their bytes are bounded by spool.max_bytes), however many
    experiences were cut before; it never lists the store nor reads a meta.json.
    """

    def __init__(self, store: ExperienceStore, listed: Sequence[int] | None = None):
        self.store = store
        self.sizes: dict[int, int] = {index: store.segment_bytes(index) for index in store.pending(listed)}
        self.total = sum(self.sizes.values())
        self.newly_trained: list[int] = []

    def add(self, index: int, size: int) -> None:
        """Experience ``index`` was just cut; its labeled segment holds ``size`` bytes."""
        self.total += size - self.sizes.get(index, 0)
        self.sizes[index] = size

    def refresh(self) -> int:
        """Drop the experiences marked trained since the last call; returns the new total.

        Their indices gather in ``newly_trained`` until the owner takes them (``take_trained``).
        """
        for index in [i for i in self.sizes if self.store.is_trained(i)]:
            self.total -= self.sizes.pop(index)
            self.newly_trained.append(index)
        return self.total

    def take_trained(self) -> list[int]:
        """The experiences ``refresh`` saw marked trained since the last call (for retention)."""
        taken, self.newly_trained = self.newly_trained, []
        return taken
