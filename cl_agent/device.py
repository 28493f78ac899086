"""Devices: the one place that turns a device name ("auto", "cpu", "cuda", "cuda:N") into a torch.device,
and host-to-device copies that do not stall the host."""

from __future__ import annotations

import re

import torch

from cl_agent.errors import CLAgentError

ACCEPTED = "auto, cpu, cuda or cuda:N"
_CUDA = re.compile(r"cuda(?::(\d+))?")


def resolve_device(name: str | torch.device, what: str = "device") -> torch.device:
    """"auto" -> cuda if available else cpu; "cpu"; "cuda" / "cuda:N" when that device exists.

    `what` names the setting in error messages (a config key or a command-line option).
    """
    if isinstance(name, torch.device):
        text = str(name)
    elif isinstance(name, str):
        text = name.strip()
    else:
        raise CLAgentError(f"{what} = {name!r}: expected {ACCEPTED}")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.fullmatch(text)
    if match is None:
        raise CLAgentError(f"{what} = {name!r}: expected {ACCEPTED}")
    if not torch.cuda.is_available():
        raise CLAgentError(f"{what} = {name!r}: CUDA is not available on this machine")
    if match.group(1) is not None:
        index = int(match.group(1))
        count = torch.cuda.device_count()
        if index >= count:
            raise CLAgentError(
                f"{what} = {name!r}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                f"(cuda:0 to cuda:{count - 1})"
            )
        return torch.device("cuda", index)
    return torch.device("cuda")


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to CUDA through pinned memory without waiting for the copy.

    A plain ``.to("cuda")`` of pageable memory waits until the GPU has run everything queued
    before it. The training step issues a few such small copies (random augmentation
    parameters, memory slots) per batch; pinned, asynchronous copies keep the host issuing work.
    """
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)
