"""Retention of trained experiences' data: the disk a long-running agent uses stays bounded.

Every experience keeps its data on disk after it is trained: its labeled segment in the
spool and the unlabeled frames drawn for it. At the default sizes that is tens of MB per
experience, so an agent that cuts one every few minutes would fill a robot's disk in days.
``TrainedRetention`` keeps the newest trained experiences' data up to ``spool.keep_trained_bytes``
and deletes the oldest past it. What stays: ``meta.json`` (counts, classes and the
(sender, seq) keys that recognise a retried message for the life of the working directory)
and the ``trained`` marker; a ``pruned`` marker says the data is gone.

Only experiences marked trained are touched, and the trainer marks an experience only after
its update is checkpointed and recorded (published, or recorded with the reason the publish
was refused; a skipped experience is recorded as skipped), so nothing an update still needs
is deleted. The
marker is written before the files are removed: a crash in between leaves files that the
next start removes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

from cl_agent.experience import PRUNED_MARKER, UNLABELED_FILE, ExperienceStore
from cl_agent.spool import segment_name
from cl_agent.storage import atomic_write_text

log = logging.getLogger(__name__)

KEEP_ALL = -1


class TrainedRetention:
    """The data of trained experiences, newest kept up to ``max_bytes`` (``KEEP_ALL``: never delete).

    Built with one scan of the trained experiences (a stat or two each, no meta.json read); afterwards the owner
    ``add``s the experiences it sees marked trained, and the oldest go once the total passes
    ``max_bytes``. ``total``: the bytes kept; ``pruned``: experiences deleted by this object.
    ``trained``: the experiences marked trained, in order, when the caller knows them (else the
    store is listed and each one checked for its marker).
    """

    def __init__(self, store: ExperienceStore, max_bytes: int, trained: Iterable[int] | None = None):
        if max_bytes < KEEP_ALL:
            raise ValueError(f"max_bytes must be >= 0, or {KEEP_ALL} to keep everything; got {max_bytes}")
        self.store = store
        self.max_bytes = max_bytes
        self.sizes: dict[int, int] = {}  # trained experience -> bytes of its data on disk; oldest first
        self.total = 0
        self.pruned = 0
        if trained is None:
            trained = [i for i in store.indices() if store.is_trained(i)]
        for index in trained:
            if store.is_pruned(index):
                # A crash may have come between the marker and the removal. The frames file goes last
                # (and every cut experience has one), so while it is there the removal is unfinished.
                if (store.experience_dir(index) / UNLABELED_FILE).exists():
                    self._remove_files(index)
            else:
                self._track(index)
        self.prune()

    def add(self, indices: Iterable[int]) -> list[int]:
        """Experiences newly marked trained; returns those whose data was deleted to stay within max_bytes."""
        for index in sorted(indices):
            if index not in self.sizes and not self.store.is_pruned(index):
                self._track(index)
        return self.prune()

    def prune(self) -> list[int]:
        """Delete the oldest trained experiences' data until the total is within max_bytes."""
        deleted = []
        while self.max_bytes != KEEP_ALL and self.total > self.max_bytes and self.sizes:
            index = next(iter(self.sizes))
            try:
                atomic_write_text(self.store.experience_dir(index) / PRUNED_MARKER, f"{time.time()}\n")
                self._remove_files(index)
            except OSError as e:  # e.g. a read-only folder: keep the data and say so; the next call tries again
                log.warning("cannot delete the data of trained experience %d (spool.keep_trained_bytes): %s", index, e)
                break
            self.total -= self.sizes.pop(index)
            self.pruned += 1
            deleted.append(index)
        if deleted:
            log.info(
                "deleted the data of %d trained experience(s), %d to %d; %d bytes of trained data kept (spool.keep_trained_bytes = %d)",
                len(deleted), deleted[0], deleted[-1], self.total, self.max_bytes,
            )
        return deleted

    def _track(self, index: int) -> None:
        size = 0
        for path in self._files(index):
            try:
                size += path.stat().st_size
            except FileNotFoundError:
                pass
        self.sizes[index] = size
        self.total += size

    def _files(self, index: int) -> list[Path]:
        return [self.store.spool_dir / segment_name(index), self.store.experience_dir(index) / UNLABELED_FILE]

    def _remove_files(self, index: int) -> None:
        for path in self._files(index):  # the labeled segment first, the frames file last
            path.unlink(missing_ok=True)

