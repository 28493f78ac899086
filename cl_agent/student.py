"""The student network: a timm backbone by name, a linear classifier and a 4-way rotation head.

The backbone is created with ``num_classes=0`` so that it returns pooled features;
their size is read from the model (one forward pass), so any timm model works.
"""

from __future__ import annotations

import timm
import torch
from torch import nn

from cl_agent.config import ModelSection
from cl_agent.errors import CLAgentError

ROTATIONS = 4  # 0, 90, 180, 270 degrees


class Student(nn.Module):
    """Backbone -> pooled features (B, D) -> class logits (B, K) and rotation logits (B, 4).

    Input: float32 (B, 3, H, W), already normalised with ModelSection.mean/std.
    """

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.classifier = nn.Linear(feature_dim, num_classes)
        self.rotation = nn.Linear(feature_dim, ROTATIONS)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)  # (B, D): timm with num_classes=0 pools and skips its own head

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(features)  # (B, K)

    def forward_rotation(self, features: torch.Tensor) -> torch.Tensor:
        return self.rotation(features)  # (B, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _pooled_feature_size(backbone: nn.Module, model: ModelSection) -> int:
    """D of the backbone's pooled output, measured with one tiny forward pass.

    ``num_features`` is not enough: models with a pre-logits layer (e.g. MobileNetV3's
    conv head) return ``head_hidden_size`` features instead.
    """
    backbone.eval()
    try:
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, model.image_size, model.image_size))
    except (RuntimeError, ValueError, AssertionError) as e:  # timm raises these for unsupported input sizes
        raise CLAgentError(
            f"model.backbone = {model.backbone!r} cannot run on {model.image_size}x{model.image_size} images "
            f"(model.image_size): {e}"
        ) from None
    finally:
        backbone.train()
    if out.ndim != 2:
        raise CLAgentError(f"model.backbone = {model.backbone!r} returns {tuple(out.shape)}, not pooled (B, D) features")
    return int(out.shape[1])


def backbone_problem(name: str) -> str | None:
    """Why ``name`` cannot be the student's backbone (checked without building it); None if it can."""
    if not timm.is_model(name):
        return f"model.backbone = {name!r}: timm has no model of that name (see timm.list_models())"
    return None


def create_student(model: ModelSection) -> Student:
    """Build the student for ``model.backbone`` (any name ``timm.list_models()`` knows), untrained."""
    problem = backbone_problem(model.backbone)
    if problem:
        raise CLAgentError(problem)
    backbone = timm.create_model(model.backbone, pretrained=False, num_classes=0)
    feature_dim = _pooled_feature_size(backbone, model)
    return Student(backbone, feature_dim, model.num_classes)


def student_problem(model: ModelSection) -> str | None:
    """Why no student can be built for ``model`` (an unknown backbone, or one that cannot run on
    ``model.image_size`` images), found without training memory: the build and its shape check run on the
    meta device (shapes only, well under a second even for large backbones). The meta device lacks a few
    operations, so a failure there is confirmed by a real build before it counts."""
    problem = backbone_problem(model.backbone)
    if problem:
        return problem
    try:
        with torch.device("meta"):
            create_student(model)
        return None
    except Exception:  # noqa: BLE001 -- the real build below decides
        pass
    try:
        create_student(model)
    except CLAgentError as e:
        return str(e)
    return None


HIDDEN_LOGIT_OFFSET = -1e4  # added to unseen classes at inference (finite, so fp16 runtimes stay finite)


class SeenClassMask(nn.Module):
    """Wraps a network for inference: classes never trained on get a large negative logit.

    An untrained class keeps its initial bias and would otherwise be predicted
    now and then; the mask is a constant buffer, so it exports to ONNX as one Add.
    """

    def __init__(self, network: nn.Module, seen: torch.Tensor):
        super().__init__()
        self.network = network
        hidden = ~seen.bool() if seen.any() else torch.zeros_like(seen, dtype=torch.bool)
        self.register_buffer("offset", hidden.float() * HIDDEN_LOGIT_OFFSET)  # (K,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x) + self.offset
