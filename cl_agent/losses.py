"""Loss terms as pure tensor functions. Every function returns a scalar tensor.

Logits are (B, K) over the whole class space; masks are bool (K,) or (B, K)
with True = class hidden from the softmax. Callers pass float32 logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASKED_LOGIT = -1e9  # value given to hidden classes (finite: a row with every class hidden stays NaN-free)


def apply_mask(logits: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """Set hidden classes to MASKED_LOGIT (a new tensor). hidden: bool (K,) or (B, K)."""
    if hidden is None:
        return logits
    return logits.masked_fill(hidden, MASKED_LOGIT)


def ace_mask(labels: torch.Tensor, seen: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """ER-ACE mask for a labeled batch: bool (K,), True = hidden.

    Hidden: classes not seen yet, and classes of earlier experiences (``previous``)
    that are absent from this batch. seen, previous: bool (K,).
    """
    in_batch = torch.zeros_like(seen)
    in_batch[labels] = True
    return ~seen | (previous & ~in_batch)


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, hidden: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy over the classes not hidden. logits (B, K), labels (B,)."""
    return F.cross_entropy(apply_mask(logits, hidden), labels)


def feature_distillation(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance between pooled features, summed over D, mean over B. (B, D) each."""
    return (student - teacher.detach()).pow(2).sum(dim=1).mean()


def symmetry_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """||A - A^T||^2 / B + ||C - C^T||^2 / K with A = Ps Pt^T (B, B) and C = Ps^T Pt (K, K).

    Zero when the student's and the teacher's probabilities agree: it asks the
    student to relate samples (A) and classes (C) the way the teacher does.
    """
    ps = F.softmax(student_logits, dim=1)  # (B, K)
    pt = F.softmax(teacher_logits.detach(), dim=1)  # (B, K)
    a = ps @ pt.T  # (B, B)
    c = ps.T @ pt  # (K, K)
    return (a - a.T).pow(2).sum() / ps.shape[0] + (c - c.T).pow(2).sum() / ps.shape[1]


def kl_distillation(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of temperature-softened distributions, x T^2 (Hinton), mean over B."""
    log_ps = F.log_softmax(student_logits / temperature, dim=1)
    log_pt = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    return F.kl_div(log_ps, log_pt, log_target=True, reduction="batchmean") * temperature**2


def rotation_loss(rotation_logits: torch.Tensor, rotation_labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the 4-way rotation head. (B, 4), (B,)."""
    return F.cross_entropy(rotation_logits, rotation_labels)


def memory_replay(logits: torch.Tensor, labels: torch.Tensor, stored_logits: torch.Tensor) -> torch.Tensor:
    """Replay of memory items through the classifier: CE to the label + KL to the stored logits.

    logits (B, K) from the current classifier on stored features (hidden classes
    already masked), labels (B,), stored_logits (B, K) as stored.
    """
    ce = F.cross_entropy(logits, labels)
    kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(stored_logits, dim=1), log_target=True, reduction="batchmean")
    return ce + kl


def margin_constraint(
    logits: torch.Tensor, current: torch.Tensor, previous: torch.Tensor, unseen: torch.Tensor, margin: float
) -> torch.Tensor:
    """X-DER margin constraints on labeled logits (B, K); current/previous/unseen: bool (K,).

    Past: the best current-class probability (softmax over current classes) should
    beat the best previous-class one (softmax over previous classes) by ``margin``.
    Future: the best current-class logit should beat every unseen-class logit by
    ``margin``. Each part is the mean of its positive violations.
    """
    total = logits.new_zeros(())
    if current.any() and previous.any():
        good = F.softmax(logits[:, current], dim=1).amax(dim=1)
        bad = F.softmax(logits[:, previous], dim=1).amax(dim=1).detach()
        total = total + _mean_positive(bad + margin - good)
    if current.any() and unseen.any():
        total = total + _mean_positive(logits[:, unseen].amax(dim=1) + margin - logits[:, current].amax(dim=1))
    return total


def _mean_positive(violation: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (0 if none), without a device sync."""
    positive = violation > 0
    return (violation * positive).sum() / positive.sum().clamp_min(1)
