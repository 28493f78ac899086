"""One trainer checkpoint file: written atomically, read with ``torch.load(weights_only=True)``.

The file holds only tensors and plain containers (dicts, lists, numbers,
strings), so loading never unpickles code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from cl_agent.errors import CLAgentError
from cl_agent.storage import atomic_write_bytes

FORMAT_VERSION = 1


def save_state(path: str | Path, state: dict) -> Path:
    """Serialise ``state`` (tensors + plain containers) to ``path``: temp file, fsync, rename."""
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **state}, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_state(path: str | Path, mmap: bool = False) -> dict:
    """Read a checkpoint written by ``save_state``; tensors stay on the CPU.

    ``mmap``: map the file instead of reading it (tensors are paged in when touched): cheap when only
    the plain entries are wanted, such as the model section a start check compares."""
    path = Path(path)
    if not path.is_file():
        raise CLAgentError(f"checkpoint {str(path)!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:  # torch's unpickler raises these on bad files
        raise CLAgentError(f"checkpoint {str(path)!r} could not be read: {e}") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CLAgentError(f"checkpoint {str(path)!r} has format {found!r}, expected {FORMAT_VERSION}")
    return state
