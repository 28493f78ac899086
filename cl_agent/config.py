"""Typed configuration, loaded from YAML.

Every section is a dataclass whose fields are the interface: a YAML key that is
not a field is an error, and so is a value of the wrong type or out of range.
Errors name the key (dotted path), the value and the file.

Range checks live in field metadata (``ge``, ``gt``, ``le``, ``lt``) or in a
section's ``validate()`` method, which raises ``ConfigValueError(field, value,
reason)``; the loader adds the key path and the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A configuration problem, with the key, value and file that caused it."""

    def __init__(self, key: str | None, value: Any, source: str, reason: str):
        self.key, self.value, self.source, self.reason = key, value, source, reason
        # key None: a problem with the file as a whole (missing, unreadable, not YAML)
        super().__init__(f"{source}: {reason}" if key is None else f"{source}: key '{key}' = {value!r}: {reason}")


class ConfigValueError(ValueError):
    """Raised by a section's validate(); the loader turns it into a ConfigError."""

    def __init__(self, field_name: str, value: Any, reason: str):
        self.field_name, self.value, self.reason = field_name, value, reason
        super().__init__(f"{field_name} = {value!r}: {reason}")


def _range(ge=None, gt=None, le=None, lt=None) -> dict:
    return {k: v for k, v in dict(ge=ge, gt=gt, le=le, lt=lt).items() if v is not None}


# --------------------------------------------------------------------------- sections


@dataclass
class AgentSection:
    workdir: str = "runs/agent"  # working directory: spool, experiences, checkpoints, logs, resolved config
    model_name: str = "student"  # name of the model in the repository
    device: str = "auto"  # "auto" (cuda if available, else cpu), "cpu", "cuda", "cuda:N"
    seed: int = 0  # seed for sampling, augmentation and initialisation
    grace_period_s: float = field(default=30.0, metadata=_range(gt=0))  # SIGTERM: time the trainer and server get to exit (training stops at its next step; a checkpoint, export or publish under way finishes)
    log_json: bool = False  # structured JSON-lines logs instead of plain text
    log_level: Literal["debug", "info", "warning", "error"] = "info"  # minimum log level
    log_max_bytes: int = field(default=100_000_000, metadata=_range(ge=0))  # each log file in the workdir is rotated past this size (0 = never)
    log_backups: int = field(default=3, metadata=_range(ge=1))  # rotated files kept per log (agent.log.1 .. agent.log.N), the oldest deleted
    host_server: bool = True  # also run a serving process, so one command gives a working deployment
    backlog_policy: Literal["merge", "shorten"] = "merge"  # experiences queued behind an update: merge them, or shorten epochs
    accept_lost_checkpoints: bool = False  # start even when the checkpoint of the newest trained experience is missing (continue from an older one, or untrained); for one start after such a loss

    def validate(self) -> None:
        if not self.workdir.strip():
            raise ConfigValueError("workdir", self.workdir, "must name a folder (empty would mean the current directory)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigValueError("device", self.device, "expected auto, cpu, cuda or cuda:N")
        from cl_agent.errors import CLAgentError
        from cl_agent.repository import check_model_name

        try:
            check_model_name(self.model_name)
        except CLAgentError:
            raise ConfigValueError(
                "model_name", self.model_name, "expected one path component: letters, digits, '-', '_', '.', not starting with '.'"
            ) from None


@dataclass
class CurveSection:
    enabled: bool = False  # require CURVE encryption + client authentication on every endpoint
    server_secret_key: str = ""  # path to the server's secret key file (cl-agent keys make DIR)
    authorized_clients_dir: str = ""  # folder of client public key files allowed to connect

    def validate(self) -> None:
        if not self.enabled:
            return
        if not self.server_secret_key:
            raise ConfigValueError(
                "server_secret_key", self.server_secret_key,
                "is empty, and curve.enabled needs the agent's secret key file (cl-agent keys make DIR writes DIR/agent.key_secret)",
            )
        if not self.authorized_clients_dir:
            raise ConfigValueError(
                "authorized_clients_dir", self.authorized_clients_dir,
                "is empty, and curve.enabled needs the folder of the public key files of the clients allowed to connect",
            )


@dataclass
class WireSection:
    max_parts: int = field(default=257, metadata=_range(ge=2))  # header + images per message
    max_header_bytes: int = field(default=65_536, metadata=_range(ge=256))  # JSON header size limit
    max_part_bytes: int = field(default=4_000_000, metadata=_range(ge=1))  # one encoded image
    max_message_bytes: int = field(default=64_000_000, metadata=_range(ge=1))  # all parts together
    max_image_side: int = field(default=4096, metadata=_range(ge=1))  # width or height, declared and actual
    max_image_pixels: int = field(default=16_777_216, metadata=_range(ge=1))  # width * height (decompression bombs)
    encodings: list[str] = field(default_factory=lambda: ["jpeg", "png", "raw"])  # accepted encodings

    def validate(self) -> None:
        bad = [e for e in self.encodings if e not in ("jpeg", "png", "raw")]
        if bad or not self.encodings:
            raise ConfigValueError("encodings", self.encodings, "each must be one of jpeg, png, raw")


@dataclass
class IngestSection:
    labeled_endpoint: str = "tcp://127.0.0.1:5555"  # ROUTER that labeled senders (DEALER/REQ) connect to
    frame_endpoint: str = "tcp://127.0.0.1:5556"  # where camera frames arrive
    frame_socket: Literal["pull", "sub", "router"] = "pull"  # pull: PUSH senders; sub: PUB senders (imagezmq REQ_REP=False); router: REQ senders (imagezmq default), each frame answered "OK"
    frame_connect: list[str] = field(default_factory=list, metadata={"endpoints": True})  # also connect the frame socket to these (e.g. imagezmq PUB senders, which bind)
    frame_hwm: int = field(default=64, metadata=_range(ge=1))  # receive high-water mark: excess frames are dropped
    max_batch_messages: int = field(default=64, metadata=_range(ge=1))  # labeled messages per group commit (one fsync)
    control_endpoint: str = "tcp://127.0.0.1:5559"  # REP socket for status queries and end-of-experience markers
    curve: CurveSection = field(default_factory=CurveSection)  # optional CURVE authentication
    wire: WireSection = field(default_factory=WireSection)  # message validation limits


@dataclass
class SpoolSection:
    max_bytes: int = field(default=2_000_000_000, metadata=_range(ge=1))  # labeled spool size limit; past it senders get a negative ack
    group_commit_ms: float = field(default=0.0, metadata=_range(ge=0))  # extra wait for more messages before one fsync; 0 = one fsync per drained batch
    max_classes: int = field(default=0, metadata=_range(ge=0))  # label map size (0 = model.num_classes); a new class past it is refused
    classes: list[str] = field(default_factory=list)  # fixed class set, e.g. [pallet, box, person]: ids in this order, any other name refused (bad_label); [] = names added as they arrive
    keep_trained_bytes: int = field(default=10_000_000_000, metadata=_range(ge=-1))  # data of trained experiences kept on disk (labeled segments + drawn frames), the oldest deleted past this; -1 = keep all


@dataclass
class ReservoirSection:
    capacity: int = field(default=5000, metadata=_range(ge=1))  # encoded frames kept (bounded memory)
    per_source: bool = False  # a separate reservoir per sender id, capacity split evenly
    max_sources: int = field(default=64, metadata=_range(ge=1))  # per_source: senders past this many share one reservoir


@dataclass
class ExperienceSection:
    labeled_samples: int = field(default=500, metadata=_range(ge=1))  # cut an experience after this many labeled samples
    max_wait_s: float = field(default=600.0, metadata=_range(gt=0))  # ... or after this long
    min_samples: int = field(default=32, metadata=_range(ge=1))  # ... if at least this many arrived
    unlabeled_samples: int = field(default=1000, metadata=_range(ge=0))  # frames drawn from the reservoir per experience


@dataclass
class ModelSection:
    backbone: str = "resnet18"  # any timm model name; the feature size is read from the model
    num_classes: int = field(default=100, metadata=_range(ge=2))  # size of the class space (classes arrive over time)
    image_size: int = field(default=32, metadata=_range(ge=8))  # square input size in pixels
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])  # input normalisation (RGB, 0-1 scale)
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])  # input normalisation (RGB, 0-1 scale)
    ensemble_ema: bool = True  # predict with the mean of the student's and its EMA's logits

    def validate(self) -> None:
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) != 3:
                raise ConfigValueError(name, value, "expected 3 numbers (R, G, B)")
        if any(s <= 0 for s in self.std):
            raise ConfigValueError("std", self.std, "every entry must be > 0")


@dataclass
class TrainSection:
    method: str = "mlkd_ssl"  # mlkd_ssl, naive, lwf_unlabeled, joint, or an ablation (see docs/method.md)
    labeled_batch: int = field(default=64, metadata=_range(ge=2))  # labeled images per step (>= 2: BatchNorm cannot train on one image)
    unlabeled_batch: int = field(default=100, metadata=_range(ge=0))  # unlabeled images per step (distillation)
    rotation_images: int = field(default=25, metadata=_range(ge=0))  # unlabeled images rotated 4 ways per step (SSL)
    memory_batch: int = field(default=10, metadata=_range(ge=0))  # memory items replayed per step (0 = no replay)
    memory_size: int = field(default=200, metadata=_range(ge=0))  # representation memory (feature, logits, label), no images
    lr: float = field(default=4e-4, metadata=_range(gt=0))  # Adam learning rate
    epochs_base: int = field(default=74, metadata=_range(ge=1))  # epochs(t) = max(epochs_min, epochs_base - t)
    epochs_min: int = field(default=25, metadata=_range(ge=1))  # floor of the epoch schedule
    time_budget_s: float = field(default=0.0, metadata=_range(ge=0))  # per-experience wall-clock budget; 0 = none
    ema_decay: float = field(default=0.996, metadata=_range(gt=0, lt=1))  # EMA teacher decay
    snapshots: int = field(default=2, metadata=_range(ge=0))  # EMA models of past experiences kept as teachers
    snapshot_mode: Literal["frozen", "ema"] = "frozen"  # frozen snapshots, or the reference code's EMA-updated ones
    ce_ssl_factor: float = field(default=0.1, metadata=_range(ge=0))  # CE weight = 1 - ce_ssl_factor * ssl_weight(t)
    kd_feature_base: float = field(default=0.002, metadata=_range(ge=0))  # feature KD weight = kd_feature_base * (t + 1)
    kd_logit_weight: float = field(default=0.1, metadata=_range(ge=0))  # logit distillation weight (unlabeled, t >= kd_unlabeled_start)
    kd_logit_kind: Literal["symmetry", "kl"] = "symmetry"  # ||A - A^T||^2/B + ||C - C^T||^2/K, or temperature KL
    kd_temperature: float = field(default=2.0, metadata=_range(gt=0))  # temperature for kd_logit_kind = kl
    ssl_base: float = field(default=0.5, metadata=_range(ge=0))  # ssl_weight(t) = ssl_base * ssl_decay^t
    ssl_decay: float = field(default=0.95, metadata=_range(gt=0, le=1))  # 1.0 = fixed SSL weight
    memory_weight: float = field(default=0.4, metadata=_range(ge=0))  # replay loss weight (CE + KL to stored logits)
    margin_weight: float = field(default=0.0, metadata=_range(ge=0))  # optional X-DER margin constraint weight (0.01 in the reference)
    margin: float = field(default=0.1, metadata=_range(ge=0))  # X-DER margin
    kd_unlabeled_start: int = field(default=1, metadata=_range(ge=0))  # first experience t with distillation on unlabeled data (feature and logit KD; the reference: 1)
    lwf_weight: float = field(default=1.0, metadata=_range(ge=0))  # lwf_unlabeled: KL weight against the frozen previous model
    lwf_temperature: float = field(default=2.0, metadata=_range(gt=0))  # lwf_unlabeled: KL temperature
    ema_copy_classifier: bool = True  # EMA teachers take the student's classifier each step (reference) instead of averaging it
    memory_online: bool = True  # also store each step's labeled items in the memory (ER-ACE), not only at the experience end
    teacher_batch_statistics: bool = True  # teachers normalise BN with the batch's statistics (as the student in training), not stored ones
    crop_scale_min: float = field(default=0.5, metadata=_range(gt=0, le=1))  # random resized crop: smallest area fraction
    augment: bool = True  # random resized crop + flip + RandAugment(2, 9), batched on the device
    randaugment_ops: int = field(default=2, metadata=_range(ge=0))  # RandAugment ops per image
    randaugment_magnitude: int = field(default=9, metadata=_range(ge=0, le=30))  # RandAugment magnitude
    amp: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    channels_last: bool = True  # channels_last memory format on CUDA (not applied with compile)
    compile: bool = False  # torch.compile the student
    nproc: int = field(default=1, metadata=_range(ge=1))  # processes (torchrun / DDP) for an update

    def validate(self) -> None:
        from cl_agent.method import METHODS  # imports this module: loaded by the time a config is built

        if self.method not in METHODS:
            raise ConfigValueError("method", self.method, f"unknown method (known: {', '.join(METHODS)})")


@dataclass
class ExportSection:
    parity_atol: float = field(default=1e-4, metadata=_range(gt=0))  # max |p_onnx - p_torch| allowed
    parity_samples: int = field(default=16, metadata=_range(ge=1))  # random + real images checked before publishing
    opset: int = field(default=18, metadata=_range(ge=13))  # ONNX opset
    crop_padding_taps: bool = True  # cut kernel taps that only ever read zero padding at the model's input size (same outputs, fewer weights)
    save_optimized: bool = True  # publish onnxruntime's optimised graph too: servers on the same kind of machine open it without optimising again (faster, lighter hot swaps)


@dataclass
class RepositorySection:
    root: str = "runs/models"  # model repository (Triton layout: <root>/<model>/<version>/model.onnx)
    keep_last: int = field(default=5, metadata=_range(ge=1))  # versions retained
    publish_pause_us: int = field(default=300, metadata=_range(ge=0, le=100_000))  # pause after each 256 KiB a publish copies, so it does not hold up a server on the same cores (0 = full speed)
    announce_endpoint: str = "tcp://127.0.0.1:5557"  # PUB socket announcing each published version
    fetch_endpoint: str = "tcp://127.0.0.1:5560"  # ROUTER serving manifests and model bytes to remote servers

    def validate(self) -> None:
        if not self.root.strip():
            raise ConfigValueError("root", self.root, "must name a folder (empty would mean the current directory)")


@dataclass
class ServeSection:
    endpoint: str = "tcp://127.0.0.1:5558"  # ROUTER inference endpoint
    providers: list[str] = field(default_factory=lambda: ["auto"])  # onnxruntime providers; auto = TensorRT/CUDA if present, else CPU
    intra_op_threads: int = field(default=1, metadata=_range(ge=0))  # onnxruntime threads per run; 0 = one per core
    allow_spinning: bool = False  # onnxruntime worker threads busy-wait between runs (a little faster, burns idle CPU)
    loader_nice: int = field(default=10, metadata=_range(ge=0, le=19))  # priority drop of the thread loading a new version (with 1 intra-op thread)
    loader_pause_us: int = field(default=300, metadata=_range(ge=0, le=100_000))  # pause after each 256 KiB the loader hashes, so requests are not held up (0 = full speed)
    max_batch: int = field(default=32, metadata=_range(ge=1))  # micro-batch size limit
    trt_cache_dir: str = ""  # TensorRT only: folder for built engines, so a restarted server reuses a version's engine instead of building it again ("" = no cache)
    max_wait_ms: float = field(default=2.0, metadata=_range(ge=0))  # longest a micro-batch of several queued requests waits to fill (only while requests arrive fast enough to bring more within it)
    busy_poll_us: int = field(default=1000, metadata=_range(ge=0, le=100000))  # while requests follow each other within this many microseconds, wait for the next one spinning instead of sleeping (lower latency for back-to-back clients; 0 = always sleep)
    top_k: int = field(default=5, metadata=_range(ge=1))  # classes returned per image
    poll_s: float = field(default=2.0, metadata=_range(gt=0))  # repository poll interval (fallback to announcements)
    metrics_port: int = field(default=0, metadata=_range(ge=0, le=65535))  # Prometheus /metrics of the serving process on metrics.host (0 = none)
    follow_fetch_endpoint: str = ""  # the agent's repository.fetch_endpoint: mirror its versions into this server's repository ("" = read the repository folder directly)
    follow_announce_endpoint: str = ""  # the agent's announce endpoint when following; "" = the one the agent reports (on the fetch endpoint's host), else this config's repository.announce_endpoint port
    follow_poll_s: float = field(default=5.0, metadata=_range(gt=0))  # when following: ask the agent for a newer version this often (fallback to announcements)
    follow_curve_secret_key: str = ""  # when following with CURVE: this server's secret key file (cl-agent keys make)
    follow_curve_server_key: str = ""  # when following with CURVE: the agent's public key file

    def validate(self) -> None:
        if not self.providers:
            raise ConfigValueError("providers", self.providers, "expected [auto] or a list of onnxruntime provider names")
        if self.providers == ["auto"]:
            return
        if "auto" in self.providers:
            raise ConfigValueError("providers", self.providers, "auto stands alone: [auto], or a list of provider names")
        import onnxruntime  # only for a list of names: the default needs no import

        known = onnxruntime.get_all_providers()  # every provider onnxruntime knows, installed here or not
        unknown = [p for p in self.providers if p not in known]
        if unknown:
            raise ConfigValueError(
                "providers", self.providers,
                f"{', '.join(unknown)}: not an onnxruntime provider name (e.g. CUDAExecutionProvider, CPUExecutionProvider, or [auto])",
            )


@dataclass
class MetricsSection:
    enabled: bool = True  # Prometheus /metrics endpoint
    host: str = "127.0.0.1"  # bind address (loopback by default)
    port: int = field(default=9109, metadata=_range(ge=0, le=65535))  # 0 = pick a free port
    state_interval_s: float = field(default=5.0, metadata=_range(gt=0))  # rewrite workdir/state.json (the heartbeat `cl-agent status` reads) this often
    console: bool = True  # live progress view on stderr: redrawn in place on a TTY, a line every console_interval_s otherwise (off with agent.log_json when stderr is not a TTY)
    console_interval_s: float = field(default=10.0, metadata=_range(gt=0))  # seconds between progress lines when not on a TTY


@dataclass
class AgentConfig:
    agent: AgentSection = field(default_factory=AgentSection)
    ingest: IngestSection = field(default_factory=IngestSection)
    spool: SpoolSection = field(default_factory=SpoolSection)
    reservoir: ReservoirSection = field(default_factory=ReservoirSection)
    experience: ExperienceSection = field(default_factory=ExperienceSection)
    model: ModelSection = field(default_factory=ModelSection)
    train: TrainSection = field(default_factory=TrainSection)
    export: ExportSection = field(default_factory=ExportSection)
    repository: RepositorySection = field(default_factory=RepositorySection)
    serve: ServeSection = field(default_factory=ServeSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)

    def validate(self) -> None:
        if self.spool.max_classes == 0:  # resolved here, so every component sees the number
            self.spool.max_classes = self.model.num_classes
        if self.spool.max_classes > self.model.num_classes:
            raise ConfigValueError(
                "spool.max_classes",
                self.spool.max_classes,
                f"must be <= model.num_classes ({self.model.num_classes}): the label map may not name classes the model has no output for",
            )
        self._check_classes()
        if self.serve.metrics_port and self.metrics.enabled and self.serve.metrics_port == self.metrics.port:
            raise ConfigValueError(
                "serve.metrics_port", self.serve.metrics_port, "is metrics.port too: the agent and its serving process need a port each"
            )

    def _check_classes(self) -> None:
        from cl_agent.wire import label_problem  # wire imports this module

        classes = self.spool.classes
        for i, name in enumerate(classes):
            problem = label_problem(name)
            if problem:
                raise ConfigValueError(f"spool.classes[{i}]", name, f"a class name {problem}")
            for j, other in enumerate(classes[:i]):
                if other == name:
                    raise ConfigValueError(f"spool.classes[{i}]", name, f"is spool.classes[{j}] too: each name is one class")
                if other.casefold() == name.casefold():
                    raise ConfigValueError(
                        f"spool.classes[{i}]", name, f"differs from spool.classes[{j}] {other!r} only in letter case: a typo?"
                    )
        if len(classes) > self.spool.max_classes:
            raise ConfigValueError(
                "spool.classes",
                classes,
                f"names {len(classes)} classes, more than spool.max_classes {self.spool.max_classes} "
                f"(0 means model.num_classes, {self.model.num_classes})",
            )


# --------------------------------------------------------------------------- loading


_PLAIN_INTEGER = re.compile(r"[+-]?[0-9]+")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str, source: str) -> Any:
    """Check/convert one value against a type annotation."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}  # a section left empty in YAML (`train:` with every key commented out)
        if not isinstance(value, dict):
            raise ConfigError(key, value, source, "expected a mapping (section)")
        return build(tp, value, source, prefix=key)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, value, source, f"expected one of {', '.join(map(repr, choices))}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, source)
            except ConfigError as e:
                errors.append(e.reason)
        raise ConfigError(key, value, source, " or ".join(errors))
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(key, value, source, f"expected a list of {_type_name(item)}, written [a, b] (e.g. [{value}])")
        return [_convert(item, v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(key, value, source, "expected a mapping")
        return {_convert(k_tp, k, key, source): _convert(v_tp, v, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, source, "expected true or false")
        return value
    if tp is int:
        if isinstance(value, str) and _PLAIN_INTEGER.fullmatch(value.strip()):
            return int(value)  # "1000" from a quoted YAML value or --set
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, source, "expected an integer")
        return value
    if tp is float:
        number = value
        if isinstance(value, str):
            # YAML 1.1 reads 1e-3 (no dot in the mantissa) as a string
            try:
                number = float(value)
            except ValueError:
                number = value
        if isinstance(number, bool) or not isinstance(number, (int, float)):
            raise ConfigError(key, value, source, "expected a number")
        if not math.isfinite(number):
            raise ConfigError(key, value, source, "expected a finite number")
        return float(number)
    if tp is str:
        if value is None:
            return ""  # an empty value (`key:` in YAML, `--set key=`) is the empty string
        if not isinstance(value, str):
            raise ConfigError(key, value, source, "expected a string")
        return value
    raise TypeError(f"unsupported config type {tp!r} for {key}")


def _check_range(f: dataclasses.Field, value: Any, key: str, source: str) -> None:
    meta = f.metadata
    if value is None:
        return
    if "ge" in meta and not value >= meta["ge"]:
        raise ConfigError(key, value, source, f"must be >= {meta['ge']}")
    if "gt" in meta and not value > meta["gt"]:
        raise ConfigError(key, value, source, f"must be > {meta['gt']}")
    if "le" in meta and not value <= meta["le"]:
        raise ConfigError(key, value, source, f"must be <= {meta['le']}")
    if "lt" in meta and not value < meta["lt"]:
        raise ConfigError(key, value, source, f"must be < {meta['lt']}")


ENDPOINT_SCHEMES = ("tcp", "ipc", "inproc")


def endpoint_problem(value: str) -> str | None:
    """Why ``value`` is not a ZeroMQ endpoint (``tcp://HOST:PORT``, ``ipc://PATH``, ``inproc://NAME``), or None."""
    scheme, sep, address = value.partition("://")
    if not sep or scheme not in ENDPOINT_SCHEMES:
        return f"expected an endpoint like tcp://127.0.0.1:5555 (schemes: {', '.join(ENDPOINT_SCHEMES)})"
    if not address or any(c.isspace() for c in address):
        return "the address after :// is empty or has spaces"
    if scheme == "tcp":
        host, colon, port = address.rpartition(":")
        if not colon or not host:
            return "a tcp endpoint needs HOST:PORT (e.g. tcp://127.0.0.1:5555, tcp://*:5555)"
        if port != "*" and not (port.isdigit() and 0 <= int(port) <= 65535):
            return f"port {port!r} is not a number from 0 to 65535 (or *)"
    return None


def connect_endpoint(bound: str) -> str:
    """Where this machine reaches a socket bound to ``bound``: a wildcard host (``tcp://*:5558``,
    ``tcp://0.0.0.0:5558``) cannot be connected to, its loopback address can."""
    scheme, _, address = bound.partition("://")
    host, _, port = address.rpartition(":")
    if scheme == "tcp" and host in ("*", "0.0.0.0"):
        return f"tcp://127.0.0.1:{port}"
    if scheme == "tcp" and host in ("[::]", "::"):
        return f"tcp://[::1]:{port}"
    return bound


def build(cls: type, data: dict | None, source: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    data = data or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            path = f"{prefix}.{key}" if prefix else str(key)
            known = ", ".join(sorted(fields))
            raise ConfigError(path, data[key], source, f"unknown key (known keys here: {known})")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        converted = _convert(hints[name], value, path, source)
        _check_range(fields[name], converted, path, source)
        if name.endswith("endpoint") and isinstance(converted, str) and converted:
            problem = endpoint_problem(converted)
            if problem:
                raise ConfigError(path, converted, source, problem)
        if fields[name].metadata.get("endpoints"):  # a list of endpoints: each one checked
            for i, item in enumerate(converted):
                problem = endpoint_problem(item)
                if problem:
                    raise ConfigError(f"{path}[{i}]", item, source, problem)
        kwargs[name] = converted
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate()
        except ConfigValueError as e:
            path = f"{prefix}.{e.field_name}" if prefix else e.field_name
            raise ConfigError(path, e.value, source, e.reason) from None
    return obj


def _check_duplicate_keys(node: yaml.Node, source: str, prefix: str = "") -> None:
    """Raise ConfigError for a key given twice in one mapping (plain YAML keeps the last silently)."""
    if isinstance(node, yaml.MappingNode):
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            name = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            path = f"{prefix}.{name}" if prefix else str(name)
            line = key_node.start_mark.line + 1
            if name is not None and name in first_line:
                value = value_node.value if isinstance(value_node, yaml.ScalarNode) else "..."
                raise ConfigError(path, value, source, f"duplicate key: first at line {first_line[name]}, again at line {line}")
            if name is not None:
                first_line[name] = line
            _check_duplicate_keys(value_node, source, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _check_duplicate_keys(item, source, f"{prefix}[{index}]")


def read_yaml_mapping(path: str | Path, source: str | None = None) -> dict:
    """A YAML file whose top level is a mapping, as a dict; ConfigError (naming the file, and
    the line and column where they are known) if it is missing, unreadable, not YAML, has a
    duplicate key, or is not a mapping. An empty file is {}."""
    p = Path(path)
    source = source or str(p)
    if not p.is_file():
        raise ConfigError(None, str(p), source, "config file not found" if not p.exists() else "not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(None, str(p), source, f"cannot read the file: {e}") from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _check_duplicate_keys(node, source)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = "; ".join(part for part in (e.context, e.problem) if part)
        raise ConfigError(None, str(p), source, f"{where}not valid YAML: {what}") from None
    except yaml.YAMLError as e:
        raise ConfigError(None, str(p), source, f"not valid YAML: {e}") from None
    finally:
        loader.dispose()
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(None, type(data).__name__, source, f"top level must be a mapping of sections, not a {type(data).__name__}")
    return data


def load_config(path: str | Path | None, overrides: dict | None = None) -> AgentConfig:
    """Load an AgentConfig from a YAML file (None = all defaults), then apply dotted overrides."""
    source = str(path) if path is not None else "<defaults>"
    if overrides:
        source += " (with --set overrides)"
    data: dict = {}
    if path is not None:
        data = read_yaml_mapping(path, source)
        if "bench" in data:  # not an AgentConfig section: the profiles in configs/bench/
            raise ConfigError(
                None, str(path), source,
                "this is a benchmark profile (its 'bench' section is for `cl-agent bench cir --profile FILE`), not an agent config",
            )
    for dotted, value in (overrides or {}).items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(dotted, value, source, "override path crosses a non-section value")
        node[parts[-1]] = value
    return build(AgentConfig, data, source)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def save_resolved(config: Any, path: str | Path) -> Path:
    """Write the fully resolved config (every field, defaults included) as YAML, atomically."""
    from cl_agent.storage import atomic_write_bytes

    text = yaml.safe_dump(to_dict(config), sort_keys=False)
    return atomic_write_bytes(Path(path), text.encode())


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value`` (value in YAML syntax) from the command line."""
    key, equals, raw = text.partition("=")
    key = key.strip()
    if not equals or not key:
        raise ConfigError(None, None, "<command line>", f"--set {text!r}: an override must look like section.key=value")
    if not raw.strip():
        return key, ""  # `--set key=`: the empty string (for a string field; other types reject it)
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(key, raw, "<command line>", f"value is not valid YAML: {problem}") from None
