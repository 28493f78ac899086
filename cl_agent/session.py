"""One servable model version: verified, opened in onnxruntime, signature-checked and warmed.

``load_model`` is what the server's watcher thread calls before a swap; everything
that can be wrong with a version (hash, graph, signature, a failing warm-up)
surfaces here as ``ModelLoadError``, so the serving thread only ever sees a
session that has already answered.

A version may also hold onnxruntime's optimised graph (``model.optimized.onnx``,
saved by the exporter's parity check). When it was made by the same onnxruntime
version on the same kind of CPU, and the session runs on the CPU provider, it is
opened with graph optimisation off: the same graph as optimising ``model.onnx``
would give, in a fraction of the time. Anything wrong with it (another machine,
a bad hash, a failed check) falls back to ``model.onnx``.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cl_agent.config import ServeSection
from cl_agent.errors import CLAgentError
from cl_agent.repository import OPTIMIZED_FILE, ModelRepository, manifest_problem, mismatched_files, optimized_files

log = logging.getLogger(__name__)

# CPU features onnxruntime's kernels and layout transforms choose between: an optimised graph
# made on a CPU with a different set may hold layouts the other CPU's kernels do not use.
_ISA_FLAGS = (
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
    "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8",
    "asimd", "sve", "sve2", "i8mm", "bf16",
)


class ModelLoadError(CLAgentError):
    """A version that cannot be served (bad hash, bad signature, failed warm-up)."""


@dataclass
class LoadedModel:
    """One servable version: an onnxruntime session and what its outputs mean."""

    version: int
    sha256: str
    class_names: list[str]
    image_size: int
    session: object  # onnxruntime.InferenceSession
    manifest: dict = field(repr=False, default_factory=dict)
    optimized: bool = False  # opened from the version's pre-optimised graph
    providers: list[str] = field(default_factory=list)  # the providers onnxruntime runs it with (one it could not start is left out)
    names_json: list[str] = field(init=False, repr=False)  # class_names as JSON strings, for the replies

    def __post_init__(self) -> None:
        self.names_json = [json.dumps(name) for name in self.class_names]

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (N, S, S, 3) -> float32 (N, K)."""
        (probs,) = self.session.run(["probs"], {"images": images})
        return probs


# From the CPU onnxruntime (a dependency) to the GPU build (the `gpu` extra): the two share one
# module, so uninstalling the CPU package deletes files the GPU one needs, and it is reinstalled.
GPU_SWITCH = "pip uninstall -y onnxruntime && pip install --force-reinstall --no-deps 'onnxruntime-gpu>=1.18'"


@functools.lru_cache(maxsize=1)
def runtime_packages() -> tuple[str, ...]:
    """The installed distributions that provide the ``onnxruntime`` module (exactly one is right).

    Read from the package metadata once per process: ``choose_providers`` runs at every version load."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("onnxruntime", "onnxruntime-gpu"):
        try:
            version(name)
        except PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def choose_providers(requested: list[str]) -> list[str]:
    """onnxruntime providers: ``auto`` = TensorRT, then CUDA, when installed, always ending with CPU."""
    import onnxruntime as ort

    if not hasattr(ort, "get_available_providers"):
        raise CLAgentError(
            f"the onnxruntime module in {list(getattr(ort, '__path__', []))} is incomplete, as after uninstalling one of "
            f"onnxruntime and onnxruntime-gpu while both were installed; for the GPU build repair it with: {GPU_SWITCH}"
        )
    if len(runtime_packages()) > 1:
        log.warning(
            "both onnxruntime and onnxruntime-gpu are installed: they provide the same module, so the providers "
            "depend on which was installed last; keep one (for the GPU build: %s)", GPU_SWITCH,
        )
    available = ort.get_available_providers()
    if requested == ["auto"]:
        preferred = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
        return [p for p in preferred if p in available] + ["CPUExecutionProvider"]
    missing = [p for p in requested if p not in available]
    if missing:
        raise CLAgentError(f"serve.providers = {requested}: {', '.join(missing)} not available (have {', '.join(available)})")
    return list(requested)


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=1)
def runtime_environment() -> dict:
    """What an optimised graph depends on: onnxruntime's version, the machine and its instruction sets."""
    import onnxruntime as ort

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:  # not Linux: the processor string stands in
        flags.add(platform.processor() or "unknown")
    isa = sorted(flags.intersection(_ISA_FLAGS)) if flags.intersection(_ISA_FLAGS) else sorted(flags)
    return {"onnxruntime": ort.__version__, "machine": platform.machine(), "isa": isa}


def provider_options(providers: list[str], image_size: int, max_batch: int, trt_cache_dir: str = "") -> list:
    """``providers`` with the options serving needs, in the form ``InferenceSession(providers=...)`` takes.

    TensorRT gets one optimisation profile for every batch size from 1 to ``max_batch`` (without it,
    a micro-batch bigger than any before makes it build a new engine on the serving thread), and an
    engine cache in ``trt_cache_dir`` when one is given. The other providers keep their defaults.
    """
    chosen: list = []
    for name in providers:
        if name == "TensorrtExecutionProvider":
            shape = f"{image_size}x{image_size}x3"
            options = {
                "trt_profile_min_shapes": f"images:1x{shape}",
                "trt_profile_opt_shapes": f"images:1x{shape}",
                "trt_profile_max_shapes": f"images:{max_batch}x{shape}",
            }
            if trt_cache_dir:
                options.update(trt_engine_cache_enable="True", trt_engine_cache_path=trt_cache_dir)
            chosen.append((name, options))
        else:
            chosen.append(name)
    return chosen


def load_model(repository: ModelRepository, version: int, serve: ServeSection, manifest: dict | None = None) -> LoadedModel:
    """Verify (sha256 against the manifest), open and warm one version; its optimised graph when it suits.

    ``manifest``: the version's manifest when the caller has just read it (read here otherwise).
    """
    try:
        manifest = repository.load_manifest(version) if manifest is None else manifest
        providers = choose_providers(serve.providers)
    except CLAgentError as e:
        raise ModelLoadError(f"version {version}: {e}") from None
    problem = manifest_problem(manifest)
    if problem:  # e.g. a version copied in by hand with a partial manifest: say what is wrong, not "hash differs"
        raise ModelLoadError(f"version {version}: {problem}")
    entry = manifest.get("optimized")
    suits = isinstance(entry, dict) and providers == ["CPUExecutionProvider"] and entry.get("environment") == runtime_environment()
    # A follower installs model.onnx only: a manifest may name an optimised graph that is not here.
    if suits and (repository.version_dir(version) / OPTIMIZED_FILE).is_file():
        try:
            return _load(repository, version, manifest, serve, providers, optimized_files(repository.version_dir(version), entry))
        except ModelLoadError as e:
            log.warning("version %d: not using its optimised graph (%s); opening %s", version, e, repository.model_path(version).name)
    return _load(repository, version, manifest, serve, providers, {repository.model_path(version): manifest.get("sha256")})


def _load(
    repository: ModelRepository,
    version: int,
    manifest: dict,
    serve: ServeSection,
    providers: list[str],
    files: dict[Path, object],
) -> LoadedModel:
    """Open the graph that is the first of ``files`` (each with its manifest sha256; the rest are its weights)."""
    import onnxruntime as ort

    path = next(iter(files))
    optimized = path.name == OPTIMIZED_FILE
    try:
        before = {f: _identity(f) for f in files}
        for f, why in mismatched_files(files, serve.loader_pause_us / 1e6).items():
            raise ModelLoadError(f"version {version}: {f.name}: {why or 'missing'}")
    except OSError as e:
        raise ModelLoadError(f"version {version}: {e}") from None
    names, size = manifest["class_names"], manifest["image_size"]  # checked by load_model
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if serve.intra_op_threads:
        options.intra_op_num_threads = serve.intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if serve.allow_spinning else "0")
    if optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done when it was saved
    try:
        # Opened by path, not from bytes: onnxruntime holds the GIL while it parses, and a 45 MB
        # bytes object would stall the serving thread several times longer.
        chosen = provider_options(providers, size, serve.max_batch, serve.trt_cache_dir)
        session = ort.InferenceSession(str(path), options, providers=chosen)
        unchanged = all(_identity(f) == identity for f, identity in before.items())
    except Exception as e:  # onnxruntime raises untyped errors for a bad graph, OSError for a vanished file
        raise ModelLoadError(f"version {version}: onnxruntime cannot load {path.name}: {e}") from None
    if not unchanged:
        raise ModelLoadError(f"version {version}: {path.name} or its weights changed while being loaded")
    inputs, outputs = session.get_inputs(), {o.name: o for o in session.get_outputs()}
    if len(inputs) != 1 or inputs[0].name != "images" or inputs[0].type != "tensor(uint8)":
        got = [(i.name, i.type) for i in inputs]
        raise ModelLoadError(f"version {version}: expected one uint8 input 'images', got {got}")
    if list(inputs[0].shape[1:]) != [size, size, 3]:
        raise ModelLoadError(f"version {version}: input shape {inputs[0].shape} does not match image_size {size}")
    if "probs" not in outputs or outputs["probs"].shape[-1] != len(names):
        raise ModelLoadError(f"version {version}: no 'probs' output with {len(names)} classes ({list(outputs)})")
    model = LoadedModel(
        version, str(manifest.get("sha256")), list(names), size, session, manifest, optimized=optimized, providers=session.get_providers()
    )
    # Warm-up: a session's first run pays one-off costs (about 1 ms for ResNet-18) that no request
    # should, and batch 2 exercises the dynamic batch axis. On the CPU not at max_batch: its first
    # run is measured no slower than its second, and it would put 20 ms of work beside the serving
    # thread. On a GPU every batch size: CUDA picks its convolution algorithms per input shape on
    # the first run of that shape, which no request should wait for either.
    on_gpu = model.providers[0] != "CPUExecutionProvider"
    for n in range(1, serve.max_batch + 1) if on_gpu else sorted({1, min(2, serve.max_batch)}):
        try:
            probs = model.probabilities(np.zeros((n, size, size, 3), np.uint8))
        except Exception as e:  # a graph that loads but cannot run
            raise ModelLoadError(f"version {version}: warm-up at batch {n} failed: {e}") from None
        if probs.shape != (n, len(names)) or not np.isfinite(probs).all():
            raise ModelLoadError(f"version {version}: warm-up output {probs.shape} is not finite (N, {len(names)})")
    return model
