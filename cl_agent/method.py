"""Methods by name: which loss terms a step uses, which teachers, and the per-experience schedule.

A method is data (a set of switches), not a class: the trainer's one step reads
the switches and the precomputed weights. A weight of 0 means the term is not
computed at all.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from cl_agent.config import TrainSection
from cl_agent.errors import CLAgentError

LOSS_TERMS = ("ce", "kd_feature", "kd_feature_unlabeled", "kd_logit", "lwf", "ssl", "memory", "margin")


@dataclass(frozen=True)
class Method:
    name: str
    masked_ce: bool = False  # ER-ACE masking of the labeled cross-entropy
    feature_kd: bool = False  # squared L2 to the selected teacher's pooled features
    logit_kd: bool = False  # symmetry (or KL) distillation of logits on unlabeled data
    lwf: bool = False  # KL to the frozen previous model on unlabeled data
    ssl: bool = False  # rotation self-supervision on unlabeled data
    dynamic_ssl: bool = True  # ssl_weight(t) = ssl_base * ssl_decay^t (False: ssl_base for every t)
    memory: bool = False  # replay of (feature, logits, label) items through the classifier
    margin: bool = False  # X-DER margin constraints (weight train.margin_weight; 0 disables)
    teachers: Literal["none", "ema_and_snapshots", "ema", "previous"] = "none"


_MLKD_SSL = Method(
    "mlkd_ssl", masked_ce=True, feature_kd=True, logit_kd=True, ssl=True, memory=True, margin=True, teachers="ema_and_snapshots"
)

METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _MLKD_SSL,
        Method("naive"),
        Method("lwf_unlabeled", lwf=True, teachers="previous"),
        Method("joint"),  # the caller passes the whole stream's labeled data and the total step count
        replace(_MLKD_SSL, name="mlkd_ssl_no_feature_kd", feature_kd=False),
        replace(_MLKD_SSL, name="mlkd_ssl_no_logit_kd", logit_kd=False),
        replace(_MLKD_SSL, name="mlkd_ssl_no_ssl", ssl=False),
        replace(_MLKD_SSL, name="mlkd_ssl_fixed_ssl", dynamic_ssl=False),
        replace(_MLKD_SSL, name="mlkd_ssl_single_teacher", teachers="ema"),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CLAgentError(f"train.method = {name!r}: unknown method (known: {', '.join(METHODS)})")
    return METHODS[name]


def ssl_weight(method: Method, train: TrainSection, t: int) -> float:
    if not method.ssl:
        return 0.0
    return train.ssl_base * (train.ssl_decay**t if method.dynamic_ssl else 1.0)


def loss_weights(method: Method, train: TrainSection, t: int) -> dict[str, float]:
    """The weight of every loss term for experience t (0-based). Terms a method lacks get 0."""
    ssl = ssl_weight(method, train, t)
    distill_unlabeled = t >= train.kd_unlabeled_start
    return {
        "ce": 1.0 - train.ce_ssl_factor * ssl,
        "kd_feature": train.kd_feature_base * (t + 1) if method.feature_kd else 0.0,
        "kd_feature_unlabeled": train.kd_feature_base * (t + 1) if method.feature_kd and distill_unlabeled else 0.0,
        "kd_logit": train.kd_logit_weight if method.logit_kd and distill_unlabeled else 0.0,
        "lwf": train.lwf_weight if method.lwf and t >= 1 else 0.0,
        "ssl": ssl,
        "memory": train.memory_weight if method.memory else 0.0,
        "margin": train.margin_weight if method.margin else 0.0,
    }


def epochs_for(train: TrainSection, t: int) -> int:
    """Epochs over the labeled data of experience t: max(epochs_min, epochs_base - t)."""
    return max(train.epochs_min, train.epochs_base - t)


def steps_per_epoch(images: int, batch: int) -> int:
    """Batches in one epoch over ``images`` labeled images: ceil(images / batch), one fewer when a single
    image would be left over (it joins the last batch instead: BatchNorm needs two)."""
    return -(-images // batch) - (1 if images > batch and images % batch == 1 else 0)
