"""Fetching one version's model file from the agent's fetch service: resumable and verified.

A transfer appends chunks (``FetchClient.chunk``) to a partial file named by the
version and the expected sha256, so a later attempt resumes it and only the same
bytes ever do; the finished file's hash is checked against the manifest before
anything installs it. The follower (``cl_agent/follower.py``) uses it.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Callable

from cl_agent.fetch import CHUNK_BYTES, FetchClient, FetchError

PARTIAL_PREFIX = ".fetch-"


def download(
    client: FetchClient,
    version: int,
    manifest: dict,
    folder: Path,
    max_bytes: int,
    counters: dict | None = None,
    stop: threading.Event | None = None,
    on_answer: Callable[[], None] | None = None,
) -> Path:
    """Fetch ``version``'s model into ``folder`` (resuming a partial file), verified; returns the file's path.

    The partial file is named by the version and the expected sha256, so only the
    same bytes ever resume it. Raises ``FetchError`` (reason ``corrupt`` after a
    sha256 mismatch, which also deletes the partial file so the retry starts over;
    ``stopped`` when ``stop`` is set, keeping the partial file for the next start).
    ``on_answer`` is called after each chunk the agent sends.
    """
    expected = manifest["sha256"]
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(f"{PARTIAL_PREFIX}*"):  # partial downloads of other versions will never resume
        if stale.name != f"{PARTIAL_PREFIX}{version}-{expected[:16]}.part":
            stale.unlink(missing_ok=True)
    path = folder / f"{PARTIAL_PREFIX}{version}-{expected[:16]}.part"
    digest = hashlib.sha256()
    offset = 0
    if path.exists():  # resume: hash what is already there
        with open(path, "rb") as f:
            while block := f.read(CHUNK_BYTES):
                digest.update(block)
                offset += len(block)
    size = None
    with open(path, "ab") as out:
        while size is None or offset < size:
            if stop is not None and stop.is_set():
                raise FetchError("stopped", f"stopped at byte {offset} of version {version}")
            header, data = client.chunk(version, offset)
            if on_answer is not None:
                on_answer()
            if header.get("sha256") != expected:
                raise FetchError("changed", f"version {version} on the agent has sha256 {str(header.get('sha256'))[:12]}..., not {expected[:12]}...")
            if size is not None and header["size"] != size:
                raise FetchError("changed", f"version {version} changed size during the transfer ({size} -> {header['size']})")
            size = header["size"]
            if size > max_bytes:
                raise FetchError("too_large", f"version {version} has {size} bytes, limit {max_bytes}")
            if offset > size:
                break  # the partial file is longer than the model: the hash check below refuses it
            if not data and offset < size:
                raise FetchError("truncated", f"empty chunk at offset {offset} of {size}")
            out.write(data)
            digest.update(data)
            offset += len(data)
            if counters is not None:
                counters["bytes"] = counters.get("bytes", 0) + len(data)
        out.flush()
        os.fsync(out.fileno())
    actual = digest.hexdigest()
    if actual != expected or offset != size:
        path.unlink(missing_ok=True)
        raise FetchError("corrupt", f"version {version}: got {offset} bytes with sha256 {actual[:12]}..., the manifest says {expected[:12]}...")
    return path
