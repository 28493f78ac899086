"""Batched training augmentation on the training device.

Random resized crop + horizontal flip + the geometric RandAugment ops (rotate,
shear, translate) are fused into one affine matrix per image and applied with a
single ``grid_sample``; the colour ops of RandAugment run as batched tensor ops on
the images that drew them. Random parameters are drawn from a CPU generator (a
few numbers per image, so runs are reproducible on any device) and reach the
images' device in one transfer per call (from pinned memory on CUDA, so the host
never waits for the GPU): with small images the step is bound by what the host
issues, and every blocking copy would stall it.

Magnitudes follow torchvision's RandAugment with 31 bins: at magnitude 9 a
rotation is 9 degrees, a shear 0.09, a translation 0.135 of the side, colour
factors 1 +- 0.27, posterize keeps 7 bits, solarize flips values above 0.7.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cl_agent.device import to_device

GEOMETRIC_OPS = ("rotate", "shear_x", "shear_y", "translate_x", "translate_y")
COLOUR_OPS = ("brightness", "color", "contrast", "sharpness", "posterize", "solarize", "autocontrast", "equalize")
OPS = ("identity",) + GEOMETRIC_OPS + COLOUR_OPS
BINS = 30  # magnitude scale (torchvision: 31 bins, 0..30)


@dataclass
class AugmentSettings:
    ops: int = 2  # RandAugment ops per image
    magnitude: int = 9  # RandAugment magnitude (0..30)
    crop_scale: tuple[float, float] = (0.5, 1.0)  # area fraction of the random resized crop
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range of the crop
    flip: bool = True  # random horizontal flip


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [0, 1], on the images' device."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, H, W, 3) images, got {images.dtype} {tuple(images.shape)}")
    return images.permute(0, 3, 1, 2).float().div_(255.0)


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> normalised; mean/std are (3,) tensors on x's device."""
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


# --------------------------------------------------------------------------- geometry


def _crop_flip_matrices(n: int, settings: AugmentSettings, gen: torch.Generator) -> torch.Tensor:
    """(n, 3, 3) maps from output to input coordinates (normalised, [-1, 1]) for crop + flip."""
    lo, hi = settings.crop_scale
    area = lo + (hi - lo) * torch.rand(n, generator=gen)
    log_r = math.log(settings.crop_ratio[0]) + (math.log(settings.crop_ratio[1]) - math.log(settings.crop_ratio[0])) * torch.rand(n, generator=gen)
    ratio = log_r.exp()
    w = (area * ratio).sqrt().clamp(max=1.0)  # fraction of the width
    h = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - w) * (2 * torch.rand(n, generator=gen) - 1)  # crop centre stays inside the image
    cy = (1 - h) * (2 * torch.rand(n, generator=gen) - 1)
    flip = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0) if settings.flip else torch.ones(n)
    m = torch.zeros(n, 3, 3)
    m[:, 0, 0], m[:, 0, 2] = w * flip, cx
    m[:, 1, 1], m[:, 1, 2] = h, cy
    m[:, 2, 2] = 1
    return m


def _geometric_matrices(op: torch.Tensor, sign: torch.Tensor, magnitude: int) -> torch.Tensor:
    """(n, 3, 3) affine for the geometric RandAugment op each image drew (identity otherwise)."""
    frac = magnitude / BINS
    zero = torch.zeros_like(sign)

    def amount(name: str, value: float) -> torch.Tensor:
        return torch.where(op == OPS.index(name), value * sign, zero)

    angle = amount("rotate", math.radians(30.0 * frac))
    cos, sin = angle.cos(), angle.sin()
    shift = 2 * (150 / 331) * frac  # torchvision: 150/331 of the side at magnitude 30; x2 for [-1, 1]
    rows = [
        cos, amount("shear_x", 0.3 * frac) - sin, amount("translate_x", shift),
        sin + amount("shear_y", 0.3 * frac), cos, amount("translate_y", shift),
        zero, zero, zero + 1,
    ]  # fmt: skip
    return torch.stack(rows, dim=1).view(-1, 3, 3)


# --------------------------------------------------------------------------- colour ops (x in [0, 1])


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])  # (n, 1, H, W)


def _blend(a: torch.Tensor, b: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """b + factor * (a - b): factor 1 keeps a, 0 gives b."""
    return (b + factor.view(-1, 1, 1, 1) * (a - b)).clamp_(0, 1)


def _sharpness_base(x: torch.Tensor) -> torch.Tensor:
    kernel = torch.full((3, 3), 1 / 13, device=x.device, dtype=x.dtype)  # made on the device: no host copy
    kernel[1, 1] = 5 / 13
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(3, 1, 3, 3), groups=3)
    blurred[..., 0, :], blurred[..., -1, :] = x[..., 0, :], x[..., -1, :]  # PIL keeps the border
    blurred[..., :, 0], blurred[..., :, -1] = x[..., :, 0], x[..., :, -1]
    return blurred


def _autocontrast(x: torch.Tensor) -> torch.Tensor:
    lo = x.amin(dim=(2, 3), keepdim=True)
    hi = x.amax(dim=(2, 3), keepdim=True)
    scale = torch.where(hi > lo, 1.0 / (hi - lo).clamp_min(1e-6), torch.ones_like(hi))
    lo = torch.where(hi > lo, lo, torch.zeros_like(lo))
    return ((x - lo) * scale).clamp_(0, 1)


def _equalize(x: torch.Tensor) -> torch.Tensor:
    """Per-channel histogram equalisation, batched: (n, C, H, W) -> same."""
    n, c, h, w = x.shape
    v = (x * 255).round_().long().clamp_(0, 255).flatten(2)  # (n, C, HW)
    hist = torch.zeros(n, c, 256, device=x.device).scatter_add_(2, v, torch.ones_like(v, dtype=torch.float32))
    cdf = hist.cumsum(-1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(-1, keepdim=True)
    span = (h * w - cdf_min).clamp_min(1)
    lut = ((cdf - cdf_min) / span).clamp_(0, 1)
    out = lut.gather(2, v).view(n, c, h, w)
    flat = (h * w - cdf_min).view(n, c, 1, 1) <= 0  # a single value: leave the channel alone
    return torch.where(flat, x, out)


def _colour(name: str, x: torch.Tensor, sign: torch.Tensor, magnitude: int) -> torch.Tensor:
    frac = magnitude / BINS
    factor = 1.0 + 0.9 * frac * sign  # (n,)
    if name == "brightness":
        return _blend(x, torch.zeros_like(x), factor)
    if name == "color":
        return _blend(x, _gray(x).expand_as(x), factor)
    if name == "contrast":
        return _blend(x, _gray(x).mean(dim=(2, 3), keepdim=True).expand_as(x), factor)
    if name == "sharpness":
        return _blend(x, _sharpness_base(x), factor)
    if name == "posterize":
        bits = 8 - int(round(frac * 4))
        step = 2 ** (8 - bits)
        return torch.floor(x * 255 / step) * step / 255
    if name == "solarize":
        threshold = 1.0 - frac
        return torch.where(x >= threshold, 1.0 - x, x)
    if name == "autocontrast":
        return _autocontrast(x)
    if name == "equalize":
        return _equalize(x)
    raise ValueError(f"unknown colour op {name!r}")


# --------------------------------------------------------------------------- the transform


def augment(images: torch.Tensor, settings: AugmentSettings, gen: torch.Generator) -> torch.Tensor:
    """uint8 (B, H, W, 3) on any device -> augmented float32 (B, 3, H, W) in [0, 1], same device.

    ``gen`` is a CPU generator; it decides every random choice, so the result
    depends only on its state and the images.
    """
    x = to_float(images)  # (B, 3, H, W)
    n = x.shape[0]
    if n == 0:
        return x
    op = torch.randint(0, len(OPS), (settings.ops, n), generator=gen)  # op per slot per image
    sign = torch.where(torch.rand(settings.ops, n, generator=gen) < 0.5, -1.0, 1.0)

    # one affine per image: crop/flip, then every geometric op it drew; one grid_sample for all
    matrix = _crop_flip_matrices(n, settings, gen)
    for slot in range(settings.ops):
        matrix = matrix @ _geometric_matrices(op[slot], sign[slot], settings.magnitude)

    # the colour ops each image drew, slot by slot: (name, where its images start and end in `chosen`)
    chosen, signs, applied, start = [], [], [], 0
    for slot in range(settings.ops):
        for name in COLOUR_OPS:
            idx = (op[slot] == OPS.index(name)).nonzero().flatten()
            if idx.numel():
                chosen.append(idx)
                signs.append(sign[slot][idx])
                applied.append((name, start, start + idx.numel()))
                start += idx.numel()
    packed = to_device(torch.cat([matrix[:, :2].flatten(), *signs, *(idx.float() for idx in chosen)]), x.device)
    theta = packed[: 6 * n].view(n, 2, 3)
    signs, index = packed[6 * n : 6 * n + start], packed[6 * n + start :].long()

    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    for name, a, b in applied:
        idx = index[a:b]
        x[idx] = _colour(name, x[idx], signs[a:b], settings.magnitude)
    return x
