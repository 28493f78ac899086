"""Prometheus metrics of one agent, served at ``/metrics``.

Every ``AgentMetrics`` owns a private ``CollectorRegistry`` (not the process-wide
default one), so several agents, or several tests, can live in one process.
Names, types and labels are listed in docs/observability.md and in ``METRICS``.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

from cl_agent.config import MetricsSection
from cl_agent.errors import BusyError, CLAgentError

log = logging.getLogger(__name__)

PREFIX = "cl_agent"

# Seconds; an update is one experience of training (seconds to tens of minutes).
UPDATE_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, float("inf"))
# Seconds; export = ONNX export + parity check + publish.
EXPORT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, float("inf"))

# name (without prefix) -> (type, labels, help). The single source of truth for the docs table.
METRICS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "ingest_accepted_total": ("counter", ("kind",), "Ingest messages accepted, by message kind"),
    "ingest_rejected_total": ("counter", ("reason",), "Ingest messages rejected, by reason code"),
    "frames_dropped_total": ("counter", (), "Unlabeled frames lost before reaching the agent: gaps in each camera's seq (its client's send queue was full, or the network lost them); frames the reservoir leaves out are not drops"),
    "frames_sender_clashes_total": ("counter", (), "Frame sender ids found shared by two camera streams (their seqs kept going back: 3 times within 10 s); each is warned about and counted at most once a minute per id, and its seq gaps are not counted as drops meanwhile"),
    "spool_samples": ("gauge", (), "Labeled samples in the open experience (since the last cut)"),
    "spool_bytes": ("gauge", (), "Bytes in the durable labeled spool"),
    "trained_data_bytes": ("gauge", (), "Bytes of trained experiences' data kept on disk (bounded by spool.keep_trained_bytes)"),
    "reservoir_size": ("gauge", (), "Unlabeled frames held in the reservoir"),
    "experiences_cut_total": ("counter", (), "Experiences cut from the labeled stream"),
    "experiences_trained_total": ("counter", (), "Experiences the student was trained on"),
    "experiences_pruned_total": ("counter", (), "Trained experiences whose data was deleted to keep the disk bounded"),
    "backlog_experiences": ("gauge", (), "Experiences cut and waiting to be trained"),
    "update_duration_seconds": ("histogram", (), "Wall-clock time of one student update"),
    "export_duration_seconds": ("histogram", (), "Wall-clock time of one ONNX export + parity check + publish"),
    "loss": ("gauge", ("term",), "Mean loss term of the last update"),
    "online_accuracy": ("gauge", (), "Accuracy on the last experience's labeled samples before training on them"),
    "published_version": ("gauge", (), "Newest model version published to the repository"),
    "served_version": ("gauge", (), "Model version the agent's hosted server reports it is serving (agent.host_server; absent without one)"),
    "publish_failures_total": ("counter", (), "Updates whose export was refused (the previous version stays served)"),
    "trainer_failures_total": ("counter", (), "Trainer processes that failed (raised or were killed) and were restarted"),
}


class ServeMetric(NamedTuple):
    kind: str  # "counter" or "gauge"
    labels: tuple[str, ...]
    help_text: str
    # The key of ``Server.counters`` it reports, written out rather than derived from the name (renaming a
    # metric must not make it read a key the server does not have); None for the gauges computed at scrape.
    counter_key: str | None = None


# A serving process's metrics (``cl-agent serve``, or the one ``cl-agent run`` hosts), read from its
# Server's counters at each scrape: nothing is added to the request path. Name without the prefix.
SERVE_METRICS: dict[str, ServeMetric] = {
    "serve_requests_total": ServeMetric("counter", (), "Requests received (infer and status), valid or not", "requests"),
    "serve_images_total": ServeMetric("counter", (), "Images classified", "images"),
    "serve_batches_total": ServeMetric("counter", (), "onnxruntime session runs (micro-batches)", "batches"),
    "serve_errors_total": ServeMetric("counter", (), "Error replies (refused requests, failed runs) and serving-loop errors", "errors"),
    "serve_swaps_total": ServeMetric("counter", (), "Model versions swapped in", "swaps"),
    "serve_swap_failures_total": ServeMetric(
        "counter", (), "Versions refused (manifest, hash, graph, signature or warm-up); the served one kept answering", "swap_failures"
    ),
    "serve_busy_seconds_total": ServeMetric("counter", (), "Seconds spent receiving, running and answering requests", "busy_s"),
    "serve_inference_seconds_total": ServeMetric("counter", (), "Seconds spent in session.run", "inference_s"),
    "serve_version": ServeMetric("gauge", ("model",), "Model version being served (0 before the first)"),
    "serve_largest_batch": ServeMetric("gauge", (), "Most images one session run was given", "largest_batch"),
    "serve_held_batches_total": ServeMetric("counter", (), "Micro-batches held open up to max_wait_ms for more requests", "held_batches"),
    "serve_batch_seconds": ServeMetric(
        "gauge", ("part", "quantile"), "Over the last batches (up to 2048): time in session.run (part=inference) and around it (part=handling)"
    ),
}


@dataclass
class MetricsServer:
    """A running /metrics HTTP endpoint (daemon thread); ``stop()`` closes it."""

    host: str
    port: int
    _httpd: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class AgentMetrics:
    """The agent's metrics. Methods are thread-safe (prometheus_client locks per metric).

    ``served_version``: whether the agent hosts the server (``agent.host_server``) and so knows the version
    served. Without one, ``served_version`` is not exported at all: a gauge at 0 would read as "version 0
    served" and keep ``served_version < published_version`` alerts firing; an absent series matches nothing.
    """

    def __init__(self, served_version: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict = {}
        for name, (kind, labels, help_text) in METRICS.items():
            if name == "served_version" and not served_version:
                continue
            full = f"{PREFIX}_{name}"
            if kind == "counter":
                # prometheus_client appends "_total" itself.
                metric = Counter(full.removesuffix("_total"), help_text, labels, registry=self.registry)
            elif kind == "gauge":
                metric = Gauge(full, help_text, labels, registry=self.registry)
            else:
                buckets = UPDATE_BUCKETS if name.startswith("update") else EXPORT_BUCKETS
                metric = Histogram(full, help_text, labels, buckets=buckets, registry=self.registry)
            self._metrics[name] = metric
        # Unknown until the first experience is evaluated (0 would read as "always wrong").
        self._metrics["online_accuracy"].set(float("nan"))
        # Last cumulative totals seen by sync_totals(), to turn them into counter increments.
        self._last_totals: dict[tuple, float] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ ingest

    def inc_accepted(self, kind: str, n: int = 1) -> None:
        self._metrics["ingest_accepted_total"].labels(kind=kind).inc(n)

    def inc_rejected(self, reason: str, n: int = 1) -> None:
        self._metrics["ingest_rejected_total"].labels(reason=reason).inc(n)

    def inc_dropped(self, n: int = 1) -> None:
        self._metrics["frames_dropped_total"].inc(n)

    def sync_totals(
        self,
        *,
        accepted: Mapping[str, int] | None = None,
        rejected: Mapping[str, int] | None = None,
        dropped: int | None = None,
        sender_clashes: int | None = None,
        experiences_cut: int | None = None,
        experiences_trained: int | None = None,
        publish_failures: int | None = None,
        experiences_pruned: int | None = None,
    ) -> None:
        """Feed cumulative totals (e.g. ``IngestService.counters()``); counters grow by the difference.

        A total smaller than the last one seen means its source restarted from zero: the
        new total is then added whole. ``None`` leaves a counter alone.
        """
        updates: list[tuple[str, dict, float]] = []
        for kind, total in (accepted or {}).items():
            updates.append(("ingest_accepted_total", {"kind": kind}, total))
        for reason, total in (rejected or {}).items():
            updates.append(("ingest_rejected_total", {"reason": reason}, total))
        for name, total in (
            ("frames_dropped_total", dropped),
            ("frames_sender_clashes_total", sender_clashes),
            ("experiences_cut_total", experiences_cut),
            ("experiences_trained_total", experiences_trained),
            ("publish_failures_total", publish_failures),
            ("experiences_pruned_total", experiences_pruned),
        ):
            if total is not None:
                updates.append((name, {}, total))
        with self._lock:
            for name, labels, total in updates:
                if total < 0:
                    raise ValueError(f"{name}{labels or ''}: cumulative total {total!r} is negative")
                key = (name, tuple(sorted(labels.items())))
                last = self._last_totals.get(key, 0)
                delta = total - last if total >= last else total
                self._last_totals[key] = total
                if delta:
                    metric = self._metrics[name]
                    (metric.labels(**labels) if labels else metric).inc(delta)

    def sync_ingest(self, counters: Mapping) -> None:
        """Feed ``IngestService.counters()``: its cumulative totals grow the matching counters (``sync_totals``)."""
        self.sync_totals(
            accepted={"labeled": counters["labeled_acked"], "frame": counters["frames_accepted"], "end_experience": counters["control_accepted"]},
            rejected=counters["rejected"],
            dropped=counters["frames_dropped"],
            sender_clashes=counters["frames_sender_clashes"],
            experiences_cut=counters["experiences_cut"],
            experiences_pruned=counters["experiences_pruned"],
        )

    def set_counts(
        self,
        *,
        spool_samples: int | None = None,
        spool_bytes: int | None = None,
        reservoir_size: int | None = None,
        backlog: int | None = None,
        trained_data_bytes: int | None = None,
    ) -> None:
        """Set the level gauges; ``None`` leaves a gauge as it is."""
        for name, value in (
            ("spool_samples", spool_samples),
            ("spool_bytes", spool_bytes),
            ("trained_data_bytes", trained_data_bytes),
            ("reservoir_size", reservoir_size),
            ("backlog_experiences", backlog),
        ):
            if value is not None:
                self._metrics[name].set(value)

    # ------------------------------------------------------------------ learning

    def inc_experiences_cut(self, n: int = 1) -> None:
        self._metrics["experiences_cut_total"].inc(n)

    def inc_experiences_trained(self, n: int = 1) -> None:
        self._metrics["experiences_trained_total"].inc(n)

    def observe_update(self, seconds: float, losses: Mapping[str, float]) -> None:
        """One finished update: its duration and its mean loss terms (e.g. {"ce": 0.7, "mlkd": 0.1})."""
        self._metrics["update_duration_seconds"].observe(seconds)
        for term, value in losses.items():
            self._metrics["loss"].labels(term=term).set(value)

    def observe_export(self, seconds: float) -> None:
        self._metrics["export_duration_seconds"].observe(seconds)

    def set_online_accuracy(self, accuracy: float) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"online accuracy {accuracy!r} is not in [0, 1]")
        self._metrics["online_accuracy"].set(accuracy)

    # ------------------------------------------------------------------ models

    def set_published_version(self, version: int) -> None:
        self._metrics["published_version"].set(version)

    def set_served_version(self, version: int) -> None:
        """The hosted server's version; ignored by metrics made without one (``served_version=False``)."""
        gauge = self._metrics.get("served_version")
        if gauge is not None:
            gauge.set(version)

    def inc_publish_failures(self, n: int = 1) -> None:
        self._metrics["publish_failures_total"].inc(n)

    def inc_trainer_failures(self, n: int = 1) -> None:
        self._metrics["trainer_failures_total"].inc(n)

    # ------------------------------------------------------------------ reading

    def value(self, name: str, **labels: str) -> float | None:
        """Current value of a sample, e.g. ``value("ingest_rejected_total", reason="bad_json")``.

        ``name`` is without the ``cl_agent_`` prefix; for a histogram ask for its
        ``_count`` or ``_sum`` sample. None when the sample does not exist yet.
        """
        return self.registry.get_sample_value(f"{PREFIX}_{name}", labels or None)

    def render(self) -> bytes:
        """The text exposition format, as served at /metrics."""
        return generate_latest(self.registry)

    def serve_http(self, host: str = "127.0.0.1", port: int = 0) -> tuple[MetricsServer, int]:
        """Serve /metrics from a daemon thread; port 0 picks a free port. Returns (server, actual port)."""
        server = serve_registry(self.registry, host, port, "metrics.port, or 0 for a free one")
        return server, server.port


def serve_registry(registry: CollectorRegistry, host: str, port: int, setting: str) -> MetricsServer:
    """Serve ``registry`` at /metrics from a daemon thread; port 0 picks a free port.

    ``setting``: the config key that chose the port, named in the error when it is taken.
    """
    if not 0 <= port <= 65535:
        raise CLAgentError(f"metrics port {port!r} is not in 0..65535")
    try:
        httpd, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        message = f"cannot serve metrics on {host}:{port}: {e.strerror or e}"
        if e.errno == errno.EADDRINUSE:
            raise BusyError(f"{message} (port already in use: pick another {setting})") from None
        raise CLAgentError(message) from None
    server = MetricsServer(host=host, port=httpd.server_address[1], _httpd=httpd, _thread=thread)
    log.info("metrics at %s", server.url, extra={"metrics_port": server.port})
    return server


class ServerMetrics:
    """The metrics of one serving process (``SERVE_METRICS``), collected from ``server`` at each scrape.

    ``server``: a ``cl_agent.server.Server`` (its ``stats(quantiles=...)``, ``version`` and repository's model name).
    """

    QUANTILES = (0.5, 0.99)

    def __init__(self, server) -> None:
        self._server = server
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self._server.stats(quantiles=self.QUANTILES)
        counters = stats["counters"]
        for name, (kind, labels, help_text, key) in SERVE_METRICS.items():
            full = f"{PREFIX}_{name}"
            if kind == "counter":
                yield CounterMetricFamily(full.removesuffix("_total"), help_text, value=counters[key])
                continue
            family = GaugeMetricFamily(full, help_text, labels=labels)
            if name == "serve_version":
                family.add_metric([self._server.repository.model_name], self._server.version or 0)
            elif key is not None:
                family.add_metric([], counters[key])
            else:
                for part in ("inference", "handling"):
                    for q in self.QUANTILES:
                        value = stats.get(f"{part}_ms_p{round(100 * q)}")
                        family.add_metric([part, str(q)], float("nan") if value is None else value / 1000)
            yield family

    def value(self, name: str, **labels: str) -> float | None:
        """Current value of a sample (``name`` without the ``cl_agent_`` prefix), as ``AgentMetrics.value``."""
        return self.registry.get_sample_value(f"{PREFIX}_{name}", labels or None)


def serve_from_config(metrics: AgentMetrics, section: MetricsSection) -> MetricsServer | None:
    """Start the endpoint the config asks for; None when ``metrics.enabled`` is false."""
    if not section.enabled:
        return None
    server, _ = metrics.serve_http(section.host, section.port)
    return server
