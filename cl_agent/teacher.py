"""Teachers: an EMA of the student plus snapshots of past experiences, and per-sample selection.

INVARIANT: teacher modules are in eval mode with requires_grad False; only
``Teachers.update`` and ``Teachers.start_experience`` change them.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from cl_agent.student import Student


def frozen_copy(module: Student) -> Student:
    """A deep copy in eval mode with gradients off, whose BN layers never update their statistics.

    With ``track_running_stats`` off, a BN layer in train mode normalises with
    the batch's statistics and leaves its buffers alone; in eval mode it still
    uses the stored running statistics (for inference).
    """
    clone = copy.deepcopy(module)
    clone.eval()
    clone.requires_grad_(False)
    for layer in clone.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.track_running_stats = False
    return clone


@torch.no_grad()
def ema_update(target: Student, source: Student, decay: float, copy_classifier: bool) -> None:
    """target <- decay * target + (1 - decay) * source for parameters; buffers (BN statistics) copied.

    With ``copy_classifier`` the classifier is copied instead of averaged (the
    reference implementation does this so the teacher scores the current class space).
    """
    averaged_t, averaged_s, copied_t, copied_s = [], [], [], []
    for (name, p_t), p_s in zip(target.named_parameters(), source.parameters()):
        if copy_classifier and name.startswith("classifier."):
            copied_t.append(p_t)
            copied_s.append(p_s)
        else:
            averaged_t.append(p_t)
            averaged_s.append(p_s)
    copied_t += list(target.buffers())
    copied_s += list(source.buffers())
    torch._foreach_lerp_(averaged_t, averaged_s, 1.0 - decay)  # one fused launch per group, not one per tensor
    torch._foreach_copy_(copied_t, copied_s)


class Teachers:
    """The EMA teacher and up to ``keep`` snapshots of past experiences.

    source: what a snapshot is taken of at an experience start: the EMA ("ema",
    the method) or the student ("student", the LwF baseline's previous model).
    mode: "frozen" snapshots never change; "ema" snapshots keep following the
    student like the EMA (the reference code's behaviour).
    """

    def __init__(
        self,
        student: Student,
        *,
        keep: int,
        mode: Literal["frozen", "ema"],
        decay: float,
        source: Literal["ema", "student"] = "ema",
        ema_is_teacher: bool = True,
        copy_classifier: bool = True,
    ):
        self.keep, self.mode, self.decay, self.source = keep, mode, decay, source
        self.ema_is_teacher, self.copy_classifier = ema_is_teacher, copy_classifier
        self.ema = frozen_copy(student)
        self.snapshots: list[Student] = []

    def start_experience(self, student: Student, t: int) -> None:
        """Retain the previous experience's model as a snapshot, then re-copy the EMA from the student."""
        if t >= 1 and self.keep > 0:
            self.snapshots.append(frozen_copy(self.ema if self.source == "ema" else student))
            del self.snapshots[: -self.keep]
        self.ema.load_state_dict(student.state_dict())  # parameters and BN buffers

    def update(self, student: Student) -> None:
        """After an optimizer step: move the EMA (and, in "ema" mode, the snapshots) toward the student."""
        ema_update(self.ema, student, self.decay, self.copy_classifier)
        if self.mode == "ema":
            for snapshot in self.snapshots:
                ema_update(snapshot, student, self.decay, self.copy_classifier)

    def modules(self) -> list[Student]:
        """The teachers distilled from, EMA first (it wins ties in selection)."""
        return ([self.ema] if self.ema_is_teacher else []) + self.snapshots

    def state_dict(self) -> dict:
        return {"ema": self.ema.state_dict(), "snapshots": [s.state_dict() for s in self.snapshots]}

    def load_state_dict(self, state: dict) -> None:
        self.ema.load_state_dict(state["ema"])
        self.snapshots = []
        for snapshot_state in state["snapshots"]:
            snapshot = frozen_copy(self.ema)
            snapshot.load_state_dict(snapshot_state)
            self.snapshots.append(snapshot)


@torch.no_grad()
def teacher_outputs(
    teachers: list[nn.Module], x: torch.Tensor, batch_statistics: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward per teacher over all its inputs: features (T, B, D), logits (T, B, K).

    batch_statistics: normalise BN layers with this batch's statistics, as the
    student does in training (the reference code's teachers run in train mode);
    the teachers' stored statistics are not changed either way (see frozen_copy).
    """
    features, logits = [], []
    for teacher in teachers:
        teacher.train(batch_statistics)
        f = teacher.forward_features(x)
        features.append(f)
        logits.append(teacher.forward_head(f))
        teacher.eval()
    return torch.stack(features), torch.stack(logits)


def select_teacher(teacher_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """Index (B,) of the teacher to use per sample. teacher_logits (T, B, K), hidden classes already masked.

    Labeled samples: the teacher giving the ground-truth class the highest
    probability. Unlabeled samples (labels None): the most confident teacher
    (largest max softmax). Ties go to the lowest index.
    """
    probs = F.softmax(teacher_logits.float(), dim=2)  # (T, B, K)
    if labels is None:
        score = probs.amax(dim=2)  # (T, B)
    else:
        score = probs.gather(2, labels.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(2)  # (T, B)
    return score.argmax(dim=0)


def gather_selected(stacked: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick per sample from (T, B, ...) by index (B,) -> (B, ...)."""
    return stacked[index, torch.arange(stacked.shape[1], device=stacked.device)]
