"""ONNX export of the inference model, checked against torch before anyone may publish it.

The exported graph takes what a camera client has, a batch of ``uint8`` RGB
images ``(N, H, W, 3)``, and does the rest itself: layout change, scaling,
normalisation, the forward of every module, the mean of their logits (student +
EMA ensemble), and the softmax. Outputs are ``logits`` and ``probs``, both
``(N, num_classes)`` float32.

A file that fails ``onnx.checker`` or the parity check (onnxruntime against
torch on fresh random images and on real ones) is deleted and an ``ExportError``
says why, so nothing that disagrees with torch reaches the repository.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from cl_agent.config import ExportSection
from cl_agent.crop import crop_padding_taps
from cl_agent.errors import CLAgentError

log = logging.getLogger(__name__)

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probs")
TIE_TOLERANCE = 1e-6  # probabilities this close are a tie: either class is an identical top-1
WEIGHTS_FILE_MIN_BYTES = 1024  # initializers at least this big go to the optimised graph's weights file


class ExportError(CLAgentError):
    """An export that failed or did not match torch; the model must not be published."""


class ServingGraph(nn.Module):
    """uint8 (N, H, W, 3) RGB -> (logits, probs): normalisation and ensembling inside the graph."""

    def __init__(self, modules: Sequence[nn.Module], mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.members = nn.ModuleList(modules)
        # Scale mean/std to the 0-255 range once, so the graph does one subtract and one divide.
        self.register_buffer("mean", torch.tensor([float(m) * 255.0 for m in mean]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([float(s) * 255.0 for s in std]).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float()  # (N, 3, H, W)
        x = (x - self.mean) / self.std
        logits = torch.stack([member(x) for member in self.members]).mean(dim=0)  # (N, K)
        return logits, torch.softmax(logits, dim=-1)


def _check_inputs(modules: Sequence[nn.Module], image_size: int, mean, std) -> None:
    if not modules:
        raise ExportError("export needs at least one module, got an empty list")
    if image_size < 1:
        raise ExportError(f"image_size must be >= 1, got {image_size}")
    if len(mean) != 3 or len(std) != 3:
        raise ExportError(f"mean and std need 3 entries each (RGB), got mean={list(mean)} std={list(std)}")
    if any(float(s) <= 0 for s in std):
        raise ExportError(f"std entries must be > 0, got {list(std)}")


def _parity_inputs(image_size: int, samples: int, real_images: np.ndarray | None, seed: int) -> np.ndarray:
    """Fresh random uint8 images plus up to ``samples`` real ones: (M, S, S, 3)."""
    rng = np.random.default_rng(seed)
    batches = [rng.integers(0, 256, size=(samples, image_size, image_size, 3), dtype=np.uint8)]
    if real_images is not None and len(real_images):
        real = np.asarray(real_images)
        if real.dtype != np.uint8 or real.ndim != 4 or real.shape[1:] != (image_size, image_size, 3):
            raise ExportError(
                f"real_images must be uint8 (N, {image_size}, {image_size}, 3), got {real.dtype} {tuple(real.shape)}"
            )
        pick = rng.choice(len(real), size=min(samples, len(real)), replace=False)
        batches.append(real[np.sort(pick)])
    return np.concatenate(batches)


def check_parity(
    graph: nn.Module,
    onnx_path: str | os.PathLike,
    images: np.ndarray,
    atol: float,
    optimized_path: str | os.PathLike | None = None,
) -> dict:
    """Compare onnxruntime (CPU, fp32) with torch on ``images``; raise ExportError on disagreement.

    ``optimized_path``: onnxruntime also saves the graph it optimised for this session there,
    so the graph a server can open without optimising it again is the one checked here. Its
    weights go to a file beside it, ``<name>.data``: a server memory-maps them instead of
    copying them (see ``repository.OptimizedModel``).

    Top-1 must be identical, except where torch's own probabilities of the two
    classes are equal within ``TIE_TOLERANCE`` (a tie at float32 resolution, where
    the order is decided by rounding, not by the model).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", Path(optimized_path).name + ".data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", str(WEIGHTS_FILE_MIN_BYTES))
    try:
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own untyped errors on load
        raise ExportError(f"onnxruntime cannot load the exported model: {e}") from e
    # Odd batch sizes exercise the dynamic batch axis, not just the traced one.
    ort_out, torch_out = [], []
    for chunk in (images[:1], images[1:4], images[4:]):
        if not len(chunk):
            continue
        ort_out.append(session.run(list(OUTPUT_NAMES), {INPUT_NAME: chunk}))
        with torch.no_grad():
            torch_out.append([t.float().numpy() for t in graph(torch.from_numpy(chunk))])
    logits, probs = (np.concatenate(parts) for parts in zip(*ort_out))
    torch_logits, reference = (np.concatenate(parts) for parts in zip(*torch_out))
    if probs.shape != reference.shape:
        raise ExportError(f"onnxruntime output shape {probs.shape} differs from torch {reference.shape}")
    if not np.isfinite(probs).all():
        raise ExportError("onnxruntime produced non-finite probabilities")
    diff = float(np.abs(probs - reference).max())
    top_onnx, top_torch = probs.argmax(1), reference.argmax(1)
    rows = np.arange(len(reference))
    tie = np.abs(reference[rows, top_torch] - reference[rows, top_onnx]) <= TIE_TOLERANCE
    mismatches = int(((top_onnx != top_torch) & ~tie).sum())
    stats = {
        "max_abs_diff_probs": diff,
        "max_abs_diff_logits": float(np.abs(logits - torch_logits).max()),
        "top1_mismatches": mismatches,
        "samples": int(len(images)),
        "atol": float(atol),
    }
    if diff > atol:
        raise ExportError(f"parity check failed: max |p_onnx - p_torch| = {diff:.3g} > export.parity_atol = {atol:g}")
    if mismatches:
        raise ExportError(f"parity check failed: top-1 differs from torch on {mismatches} of {len(images)} images")
    return stats


def export_onnx(
    modules: list[nn.Module],
    path: str | os.PathLike,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    export: ExportSection,
    real_images: np.ndarray | None = None,
    optimized_path: str | os.PathLike | None = None,
    on_parity_check: Callable[[], None] | None = None,
) -> dict:
    """Export ``modules`` (each: normalised float NCHW -> logits) as one ONNX graph at ``path``.

    With ``export.crop_padding_taps``, convolution taps that only read zero padding at ``image_size``
    are cut from the exported copies (``crop.py``); the parity check compares with the uncropped model.

    Graph input ``images``: uint8 (N, image_size, image_size, 3) RGB, N dynamic.
    Outputs ``logits`` (mean over modules) and ``probs`` (softmax of it).
    ``optimized_path``: also write onnxruntime's optimised graph of it for this machine there
    (see ``repository.OptimizedModel``).
    ``on_parity_check``: called once the file is written and passed ``onnx.checker``, as the
    parity check begins (progress reporting).
    Returns the parity stats; raises ExportError (and leaves no file) on failure.
    """
    import onnx

    _check_inputs(modules, image_size, mean, std)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if optimized_path is not None:
        Path(optimized_path).parent.mkdir(parents=True, exist_ok=True)
    # Export copies on the CPU in eval mode, so the caller's modules (maybe training on a GPU) are untouched.
    graph = ServingGraph([_cpu_eval_copy(m) for m in modules], mean, std).eval()  # the reference parity checks against
    example = torch.randint(0, 256, (2, image_size, image_size, 3), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        exported, cropped = _cropped(modules, graph, image_size, mean, std) if export.crop_padding_taps else (graph, 0)
        # The exporter prints progress on stdout; keep a library call quiet.
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                exported,
                (example,),
                str(path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"images": {0: batch}},
                opset_version=export.opset,
                external_data=False,
                verbose=False,
            )
        onnx.checker.check_model(str(path), full_check=True)
        if on_parity_check is not None:
            on_parity_check()
        # Fresh random images on every export; the seed is returned so a failure can be replayed.
        seed = int.from_bytes(os.urandom(4), "little")
        stats = check_parity(
            graph,
            path,
            _parity_inputs(image_size, export.parity_samples, real_images, seed),
            export.parity_atol,
            optimized_path,
        )
        stats["seed"] = seed
    except ExportError:
        _remove(path, optimized_path)
        raise
    except Exception as e:  # the exporter and the checker raise many unrelated types; all mean "not publishable"
        _remove(path, optimized_path)
        raise ExportError(f"ONNX export of the model failed: {type(e).__name__}: {e}") from e
    stats["modules"] = len(modules)
    stats["cropped_weights"] = cropped
    stats["opset"] = export.opset
    log.info("exported %s: parity max |dp| = %.2e on %d images", path, stats["max_abs_diff_probs"], stats["samples"])
    return stats


def _cropped(modules, graph: ServingGraph, image_size: int, mean, std) -> tuple[ServingGraph, int]:
    """A serving graph of fresh copies of ``modules`` with their padding-only taps cut (or ``graph``
    itself when none has any), and how many weights were cut."""
    members = [_cpu_eval_copy(m) for m in modules]
    removed = sum(crop_padding_taps(member, torch.zeros(1, 3, image_size, image_size)) for member in members)
    return (ServingGraph(members, mean, std).eval(), removed) if removed else (graph, 0)


def _cpu_eval_copy(module: nn.Module) -> nn.Module:
    import copy

    module = getattr(module, "_orig_mod", module)  # torch.compile wrapper: export the plain module
    return copy.deepcopy(module).to("cpu").float().eval()


def _remove(*paths: str | os.PathLike | None) -> None:
    """Delete exported files (and an ONNX external-data file beside each), ignoring those never written."""
    for path in map(Path, filter(None, paths)):
        for p in (path, path.with_name(path.name + ".data")):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
