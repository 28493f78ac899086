"""A built-in image stream that needs no external data: procedurally drawn shapes.

Each class is a shape kind (circle, square, triangle, ...) in its own colour
family, drawn at a random position, size and rotation over a random muted
gradient background, with noise. The classes are easy for a human and non-trivial for a small network
trained from scratch, which makes forgetting and recovery visible within a few
minutes on a CPU. It is a stand-in for camera data, not a benchmark: the real
benchmark is ``cl-agent bench cir`` on Tiny-ImageNet.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

CLASS_NAMES = [
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "star",
    "bar",
    "diamond",
]


def _polygon(center: np.ndarray, radius: float, sides: int, angle: float, star: bool = False) -> np.ndarray:
    points = []
    count = sides * 2 if star else sides
    for k in range(count):
        r = radius * (0.45 if star and k % 2 else 1.0)
        a = angle + 2 * math.pi * k / count
        points.append(center + r * np.array([math.cos(a), math.sin(a)]))
    return np.round(np.array(points)).astype(np.int32)


def draw(class_id: int, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """One RGB uint8 image (size, size, 3) of class ``class_id``."""
    if not 0 <= class_id < len(CLASS_NAMES):
        raise ValueError(f"class_id {class_id} out of range 0..{len(CLASS_NAMES) - 1}")
    base = rng.integers(0, 120, size=3)  # muted backgrounds
    image = np.empty((size, size, 3), np.float32)
    # background: a random linear gradient between two colours
    other = rng.integers(0, 120, size=3)
    ramp = np.linspace(0, 1, size, dtype=np.float32)
    ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]
    image[:] = (base * (1 - ramp[..., None]) + other * ramp[..., None]).astype(np.float32)
    image = image.astype(np.uint8)

    # each class has its own colour family (hue), like objects that tend to look alike
    hue = (class_id * 180 // len(CLASS_NAMES) + rng.integers(-8, 9)) % 180  # OpenCV hue range 0..179
    hsv = np.uint8([[[hue, rng.integers(150, 256), rng.integers(170, 256)]]])
    colour = tuple(int(c) for c in cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0])
    center = rng.uniform(0.35, 0.65, size=2) * size
    radius = rng.uniform(0.18, 0.32) * size
    angle = rng.uniform(0, 2 * math.pi)
    thick = max(1, int(size / 16))
    name = CLASS_NAMES[class_id]
    c = tuple(int(v) for v in np.round(center))
    if name == "circle":
        cv2.circle(image, c, int(radius), colour, -1, cv2.LINE_AA)
    elif name == "ring":
        cv2.circle(image, c, int(radius), colour, thick + 1, cv2.LINE_AA)
    elif name in ("square", "triangle", "diamond", "star"):
        sides = {"square": 4, "triangle": 3, "diamond": 4, "star": 5}[name]
        if name == "diamond":
            pts = _polygon(center, radius, 4, angle)
            pts = ((pts - center) * np.array([0.55, 1.0]) + center).astype(np.int32)
        else:
            pts = _polygon(center, radius, sides, angle, star=name == "star")
        cv2.fillPoly(image, [pts], colour, cv2.LINE_AA)
    elif name == "cross":
        for a in (angle, angle + math.pi / 2):
            d = radius * np.array([math.cos(a), math.sin(a)])
            p0 = tuple(int(v) for v in np.round(center - d))
            p1 = tuple(int(v) for v in np.round(center + d))
            cv2.line(image, p0, p1, colour, thick + 1, cv2.LINE_AA)
    elif name == "bar":
        d = radius * np.array([math.cos(angle), math.sin(angle)])
        p0 = tuple(int(v) for v in np.round(center - d))
        p1 = tuple(int(v) for v in np.round(center + d))
        cv2.line(image, p0, p1, colour, thick + 2, cv2.LINE_AA)
    noise = rng.normal(0, 8, size=image.shape)
    return np.clip(image.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def make_batch(class_ids: list[int] | np.ndarray, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Images (N, size, size, 3) uint8 for the given class ids."""
    return np.stack([draw(int(c), rng, size) for c in class_ids]) if len(class_ids) else np.zeros((0, size, size, 3), np.uint8)


def schedule(experiences: int, classes_per_experience: int = 3, seed: int = 0) -> list[list[int]]:
    """Class-incremental-with-repetition schedule: new classes arrive over time, old ones return.

    Experience 0 introduces the first classes; each later one mixes classes not
    seen yet (while there are any) with classes seen before.
    """
    rng = np.random.default_rng(seed)
    unseen = list(range(len(CLASS_NAMES)))
    seen: list[int] = []
    plan = []
    for t in range(experiences):
        new = unseen[: max(1, classes_per_experience - 1)] if t else unseen[:classes_per_experience]
        unseen = unseen[len(new):]
        old_count = classes_per_experience - len(new)
        old = list(rng.choice(seen, size=min(old_count, len(seen)), replace=False)) if seen and old_count > 0 else []
        classes = sorted(set(new) | {int(c) for c in old})
        if not classes:
            classes = sorted(int(c) for c in rng.choice(seen, size=min(classes_per_experience, len(seen)), replace=False))
        seen = sorted(set(seen) | set(classes))
        plan.append(classes)
    return plan
