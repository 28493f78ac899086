"""Cropping convolution kernel taps that only ever multiply zero padding, for a fixed input size.

The exported graph runs at one image size. There, a convolution's feature map can
be so small that some taps of its kernel never reach a real input position, only
padding: a 3x3 convolution (padding 1) on a 1x1 map uses its centre tap alone, and
a stride-2 one on a 2x2 map uses a 2x2 corner. Those taps add exact zeros, so
cutting them out of the kernel (and the padding with them) leaves every output
the same while the graph carries and streams fewer weights. For the ResNet-18
student at 32 px, whose last stage runs on 1x1 maps, that is 62 % of its weights.

Only plain ``nn.Conv2d`` with zero padding given as numbers is changed, and only
one that runs at a single input size; subclasses (which may pad at run time) and
anything else are left as they are. The caller works on a copy: the export
crops its own eval copies and checks the result against the uncropped model.
"""

from __future__ import annotations

import torch
from torch import nn


def used_taps(size: int, kernel: int, stride: int, padding: int, dilation: int) -> tuple[int, int, int] | None:
    """Along one axis: ``(first tap, last tap, new padding)`` for a kernel cut to the taps that ever
    read a real input position, or None when there is nothing to cut or the cut one would not be a
    plain symmetric convolution with the same number of outputs."""
    outputs = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    if outputs < 1:
        return None
    used = [
        tap
        for tap in range(kernel)
        if any(0 <= i * stride - padding + tap * dilation < size for i in range(outputs))
    ]
    if not used or (used[0] == 0 and used[-1] == kernel - 1):
        return None
    first, last = used[0], used[-1]
    if used != list(range(first, last + 1)):
        return None  # gaps (possible with dilation): a cut kernel cannot skip them
    new_padding = padding - first * dilation  # output i still reads the same positions with the first kept tap
    if new_padding < 0:
        return None
    new_kernel = last - first + 1
    if (size + 2 * new_padding - dilation * (new_kernel - 1) - 1) // stride + 1 != outputs:
        return None
    return first, last, new_padding


def _input_sizes(module: nn.Module, example: torch.Tensor) -> dict[nn.Conv2d, set[tuple[int, int]]]:
    """The (H, W) each plain Conv2d of ``module`` receives in one forward pass of ``example``."""
    sizes: dict[nn.Conv2d, set[tuple[int, int]]] = {}

    def record(conv: nn.Module, args: tuple) -> None:
        sizes.setdefault(conv, set()).add(tuple(args[0].shape[-2:]))

    hooks = [m.register_forward_pre_hook(record) for m in module.modules() if type(m) is nn.Conv2d]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def crop_padding_taps(module: nn.Module, example: torch.Tensor) -> int:
    """Cut, in place, the kernel taps of ``module``'s convolutions that only read zero padding when it runs
    on inputs shaped like ``example`` (eval mode; one forward pass records each convolution's input size).
    Returns how many weights were removed."""
    removed = 0
    for conv, shapes in _input_sizes(module, example).items():
        if len(shapes) != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            continue
        (height, width), = shapes
        cuts = []
        for axis, size in enumerate((height, width)):
            k, s, p, d = conv.kernel_size[axis], conv.stride[axis], conv.padding[axis], conv.dilation[axis]
            cuts.append(used_taps(size, k, s, p, d) or (0, k - 1, p))
        if all(first == 0 and last == k - 1 for (first, last, _), k in zip(cuts, conv.kernel_size)):
            continue
        (top, bottom, pad_h), (left, right, pad_w) = cuts
        before = conv.weight.numel()
        weight = conv.weight.detach()[:, :, top : bottom + 1, left : right + 1].contiguous()
        conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        conv.kernel_size = tuple(weight.shape[-2:])
        conv.padding = (pad_h, pad_w)
        removed += before - weight.numel()
    return removed
