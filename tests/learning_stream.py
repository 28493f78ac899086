"""A tiny class-incremental stream of separable synthetic images, for the learning-core tests."""

from __future__ import annotations

import numpy as np
import torch

from cl_agent.config import ModelSection, TrainSection

IMAGE_SIZE = 16


def class_templates(num_classes: int, seed: int = 0) -> torch.Tensor:
    """One random smooth colour pattern per class: float (K, S, S, 3) in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, 3, 4, 4, generator=gen)
    return torch.nn.functional.interpolate(coarse, size=IMAGE_SIZE, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)


def make_images(templates: torch.Tensor, labels: torch.Tensor, gen: torch.Generator, noise: float = 0.25) -> torch.Tensor:
    """uint8 (N, S, S, 3): the class pattern plus pixel noise."""
    x = templates[labels] + noise * torch.randn(len(labels), IMAGE_SIZE, IMAGE_SIZE, 3, generator=gen)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def make_stream(num_experiences: int, classes_per_experience: int, per_class: int, unlabeled: int, seed: int = 0):
    """[(labeled uint8, labels int64, unlabeled uint8)] with new classes in every experience, and the templates.

    Unlabeled frames are drawn from every class seen so far (the camera keeps seeing old objects).
    """
    num_classes = num_experiences * classes_per_experience
    templates = class_templates(num_classes, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    stream = []
    for e in range(num_experiences):
        classes = torch.arange(e * classes_per_experience, (e + 1) * classes_per_experience)
        labels = classes.repeat_interleave(per_class)
        frame_classes = torch.randint(0, (e + 1) * classes_per_experience, (unlabeled,), generator=gen)
        stream.append((make_images(templates, labels, gen), labels, make_images(templates, frame_classes, gen)))
    return stream, templates


def tiny_model(num_classes: int = 8, backbone: str = "resnet10t") -> ModelSection:
    return ModelSection(backbone=backbone, num_classes=num_classes, image_size=IMAGE_SIZE)


def tiny_train(method: str = "mlkd_ssl", **overrides) -> TrainSection:
    settings = dict(
        method=method, labeled_batch=16, unlabeled_batch=16, rotation_images=4, memory_batch=4, memory_size=24,
        epochs_base=2, epochs_min=1, lr=1e-3,
    )
    settings.update(overrides)
    return TrainSection(**settings)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def real_images(n: int, size: int) -> np.ndarray:
    """Smooth, photo-like images (gradients + a disc), unlike uniform noise."""
    import cv2

    out = np.zeros((n, size, size, 3), np.uint8)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        out[i, ..., 0] = (xx * 255 // size + 20 * i) % 256
        out[i, ..., 1] = yy * 255 // size
        out[i, ..., 2] = 128
        cv2.circle(out[i], (size // 2, size // 2), size // 4, (255 - 10 * i, 40, 200), -1)
    return out
