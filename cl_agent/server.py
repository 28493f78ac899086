"""Serving: an onnxruntime session behind a ZeroMQ ROUTER, micro-batched, hot-swapped.

One serving thread owns the ROUTER socket: it receives ``infer`` requests,
groups them into a micro-batch, runs the session and replies with the top-k
class names, their probabilities and the version that answered. A watcher
thread follows the repository (announcements on a SUB socket, polling as a
fallback): a new version is loaded and warmed in the background, its sha256 and
input/output signature are checked, and only then is the one reference the
serving thread reads swapped. A batch already running finishes on the session
it started with. A version that fails to load is logged, counted and skipped;
the old one keeps serving.

Batching: a lone request on an idle server is answered at once. When several
requests are already queued (concurrent clients), the batch takes them all and
stays open up to ``max_wait_ms`` to fill to ``max_batch`` images, if requests have
been arriving fast enough lately to bring another one within that wait (two that
met by chance at a light load are not held up for a third that is not coming). No session run
ever sees more than ``max_batch`` images: a request that would overflow the batch
waits for the next one, and a request with more images runs in chunks of
``max_batch`` whose results are joined into one reply.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from cl_agent.codec import resize_to_input
from cl_agent.config import AgentConfig, ServeSection, WireSection
from cl_agent.errors import CLAgentError, bind_failure
from cl_agent.repository import MANIFEST_FILE, ModelRepository, parse_announcement
from cl_agent.session import LoadedModel, ModelLoadError, choose_providers, load_model
from cl_agent.wire import Message, WireError, decode_message, json_number, peek_seq, prediction_reply, reply

log = logging.getLogger(__name__)

SENDER = "server"


@dataclass
class _Request:
    envelope: list[bytes]  # routing frames, up to and including the empty delimiter (REQ clients)
    frames: list[bytes]  # the whole request as received (parsed again if the model changes before it runs)
    message: Message
    images: np.ndarray  # (n, S, S, 3)
    top_k: int


class Server:
    """Hot-swapping inference server; ``start()`` returns once it is bound (and serving, if a version exists)."""

    def __init__(
        self,
        repository: ModelRepository,
        serve: ServeSection,
        wire: WireSection | None = None,
        announce_endpoint: str | None = None,
        context: zmq.Context | None = None,
    ):
        self.repository = repository
        self.serve = serve
        self.providers = choose_providers(serve.providers)  # fails here, loudly, on a provider that is not installed
        self.wire = wire or WireSection()
        self.announce_endpoint = announce_endpoint
        self._context = context or zmq.Context.instance()
        self._model: LoadedModel | None = None  # INVARIANT: replaced whole, never mutated
        self._retired: list[LoadedModel] = []  # replaced versions, freed by the watcher thread
        # (version, manifest sha, model file size, mtime_ns) refused before: not retried unless the file is rewritten
        self._failed: set[tuple[int, str, int, int]] = set()
        self._bad_manifests: set[tuple[int, int, int]] = set()  # (version, manifest size, mtime_ns) warned about
        # A request that did not fit in the last micro-batch, and the model it was parsed for; runs first in the next.
        self._pending: tuple[_Request, LoadedModel | None] | None = None
        self._arrivals = _ArrivalRate()  # the recent request rate: whether a batch waits for more
        self._lower_warned: set[int] = set()  # versions below the served one already warned about
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self.endpoint: str | None = None
        # busy_s: time spent receiving, decoding, running and replying; inference_s: the part in session.run.
        self.counters = {"requests": 0, "images": 0, "batches": 0, "errors": 0, "swaps": 0, "swap_failures": 0, "busy_poll_hits": 0}
        self.counters["largest_batch"] = 0  # most images any one session run was given (never above max_batch)
        self.counters["held_batches"] = 0  # batches held open up to max_wait_ms for more requests
        self.counters.update({"busy_s": 0.0, "inference_s": 0.0})
        self._recent: deque[tuple[float, float]] = deque(maxlen=2048)  # (handling, inference) seconds per batch
        # Repository checks (watcher thread): how many began, and the number of the last one that finished;
        # a check numbered above checks_started read at some moment began after that moment.
        self.checks_started = 0
        self.checks_done = 0

    @property
    def version(self) -> int | None:
        model = self._model
        return model.version if model else None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> "Server":
        # Bind first: a taken endpoint fails at once, not after a model load; requests that
        # arrive during the load wait in the socket and are answered by the loaded model.
        router = self._context.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        # ZeroMQ drops a peer that sends a frame above this before reading it all, rather than buffering it.
        router.setsockopt(zmq.MAXMSGSIZE, self.wire.max_message_bytes)
        try:
            router.bind(self.serve.endpoint)
        except zmq.ZMQError as e:
            router.close()
            raise bind_failure(f"cannot bind serve.endpoint {self.serve.endpoint}", e) from None
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        try:
            self._check_for_new_version()
        except BaseException:
            router.close()
            raise
        self._threads = [
            threading.Thread(target=self._serve_loop, args=(router,), name="serve", daemon=True),
            threading.Thread(target=self._watch_loop, name="serve-watch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        if self.version is None:
            log.info("listening on %s for %s (no version loaded yet)", self.endpoint, self.repository.model_name)
        else:
            log.info("serving %s version %s on %s", self.repository.model_name, self.version, self.endpoint)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stats(self, quantiles: tuple[float, ...] = (0.5,)) -> dict:
        """Counters, and quantiles over the last batches (up to 2048) of the time in session.run and around it
        (``inference_ms_p50``, ``handling_ms_p50``, ... one pair per quantile; none before the first batch)."""
        recent = list(self._recent)
        timings = {}
        if recent:
            for q, (handling, inference) in zip(quantiles, np.quantile(np.asarray(recent), quantiles, axis=0)):
                tag = f"p{round(100 * q)}"
                timings[f"handling_ms_{tag}"] = round(1000 * float(handling), 4)
                timings[f"inference_ms_{tag}"] = round(1000 * float(inference), 4)
        return {"counters": dict(self.counters), "recent_batches": len(recent), **timings}

    def reset_recent(self) -> None:
        """Forget the recent batch timings (e.g. before a measurement)."""
        self._recent.clear()

    def check_now(self) -> None:
        """Ask the watcher to look at the repository now (as an announcement would)."""
        self._wake.set()

    # ----------------------------------------------------------------- hot swap

    def _check_for_new_version(self) -> None:
        """Load the newest version above the current one that has not failed before; swap it in."""
        self.checks_started += 1
        number = self.checks_started
        try:
            self._swap_to_newest()
        finally:
            self.checks_done = number

    def _swap_to_newest(self) -> None:
        current = self.version or 0
        try:
            versions = self.repository.versions()
        except OSError as e:  # the repository folder is unreadable or being replaced; try again next time
            log.warning("cannot list %s: %s", self.repository.model_dir, e)
            return
        if versions and versions[-1] < current and versions[-1] not in self._lower_warned:
            self._lower_warned.add(versions[-1])
            log.warning(
                "the newest version of %r in %s is %d, below the served version %d (was the repository reset?); "
                "a running server only moves to higher versions: restart it to serve version %d",
                self.repository.model_name, self.repository.model_dir, versions[-1], current, versions[-1],
            )
        for version in reversed(versions):
            if version <= current:
                return
            key, manifest = self._refusal_key(version)
            if key is None or key in self._failed:
                continue
            started = time.perf_counter()
            try:
                model = load_model(self.repository, version, self.serve, manifest)
            except ModelLoadError as e:
                self._failed.add(key)
                self.counters["swap_failures"] += 1
                log.error("not swapping to version %d, still serving %s: %s", version, self.version, e)
                continue
            if self._model is not None:
                self._retired.append(self._model)
            self._model = model  # the swap: one reference; running batches keep the session they hold
            self.counters["swaps"] += 1
            log.info(
                "now serving version %d (loaded%s in %.0f ms)",
                version,
                " from its optimised graph" if model.optimized else "",
                1000 * (time.perf_counter() - started),
            )
            return

    def _refusal_key(self, version: int) -> tuple[tuple[int, str, int, int] | None, dict | None]:
        """What identifies ``version``'s bytes: (version, manifest sha256, model file size, mtime_ns), and its
        manifest (read once: the load checks the model against this same manifest).

        (None, None) when it cannot be served as it is: gone (retention removed it after the listing), or
        its manifest unreadable (warned about and counted as a swap failure once per manifest file).
        """
        folder = self.repository.version_dir(version)
        manifest_path = folder / MANIFEST_FILE
        try:
            manifest = self.repository.load_manifest(version)
            sha = str(manifest.get("sha256"))
            model = self.repository.model_path(version).stat()
        except (CLAgentError, OSError) as e:
            try:
                st = manifest_path.stat()
            except OSError:
                return None, None  # removed by retention between listing and reading
            bad = (version, st.st_size, st.st_mtime_ns)
            if bad not in self._bad_manifests:
                self._bad_manifests.add(bad)
                self.counters["swap_failures"] += 1
                log.warning("not swapping to version %d, still serving %s: %s: %s", version, self.version, manifest_path, e)
            return None, None
        return (version, sha, model.st_size, model.st_mtime_ns), manifest

    def _release_retired(self) -> None:
        """Free replaced sessions here once no batch uses them: freeing one in the serving thread would stall it."""
        still_used = []
        for model in self._retired:
            # 3 references = this list, the loop variable and getrefcount's argument: nobody else holds it.
            if sys.getrefcount(model) > 3:
                still_used.append(model)
        self._retired = still_used

    def _watch_loop(self) -> None:
        # Loading and warming a version must not slow the serving thread: run it at a lower priority.
        # Only with one intra-op thread: the session's worker threads would inherit the priority.
        if self.serve.loader_nice and self.serve.intra_op_threads == 1 and hasattr(os, "setpriority"):
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.serve.loader_nice)
            except OSError as e:
                log.warning("cannot lower the loader thread's priority: %s", e)
        sub = None
        if self.announce_endpoint:
            sub = self._context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, self.repository.model_name.encode())
            sub.connect(self.announce_endpoint)
        next_poll = time.monotonic() + self.serve.poll_s
        try:
            while not self._stop.is_set():
                self._release_retired()
                if sub is not None and sub.poll(50):
                    frames = sub.recv_multipart()
                    try:
                        body = parse_announcement(frames)
                    except ValueError as e:
                        log.warning("ignoring a malformed announcement: %s", e)
                        continue
                    if body["version"] > (self.version or 0):
                        self._check_for_new_version()
                elif self._wake.wait(0 if sub is not None else 0.05):
                    self._wake.clear()
                    self._check_for_new_version()
                elif time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + self.serve.poll_s
                    self._check_for_new_version()
        finally:
            if sub is not None:
                sub.close()

    # ----------------------------------------------------------------- serving

    def _serve_loop(self, router: zmq.Socket) -> None:
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        idle = _IdleGaps(self.serve.busy_poll_us / 1e6)
        try:
            while not self._stop.is_set():
                woke = "pending" if self._pending is not None else self._wait_for_request(poller, idle.spin_until())
                if not woke:
                    continue
                if woke == "spinning":
                    self.counters["busy_poll_hits"] += 1
                model = self._model  # one read per batch: the whole batch runs on this version
                started = time.perf_counter()
                idle.arrived(started)
                try:
                    batch = self._collect(router, model)
                    if batch:
                        inference = self._run(router, model, batch)
                        busy = time.perf_counter() - started
                        self.counters["busy_s"] += busy
                        self._recent.append((busy - inference, inference))
                except Exception:  # a bug must not kill the endpoint: log, count, keep serving (clients retry)
                    log.exception("serving loop error")
                    self.counters["errors"] += 1
                model = batch = None  # hold no old session between batches (the watcher frees it)
                idle.finished(time.perf_counter())
        finally:
            try:
                self._drain(router)
            except Exception:  # stopping goes on: the clients left unanswered retry
                log.exception("error answering the queued requests on stop")
            finally:
                router.close()

    def _drain(self, router: zmq.Socket, limit_s: float = 1.0) -> None:
        """On stop: answer the request kept for the next batch and those already queued, for up to ``limit_s``.

        A request the server has read is answered rather than left to time out; one still on
        its way when the socket closes is the client's to send again (it retries on a timeout).
        """
        model = self._model
        deadline = time.monotonic() + limit_s
        while model is not None and time.monotonic() < deadline:
            if self._pending is None and not router.get(zmq.EVENTS) & zmq.POLLIN:
                return
            batch = self._collect(router, model)
            if batch:
                self._run(router, model, batch)

    @staticmethod
    def _wait_for_request(poller: zmq.Poller, spin_until: float) -> str:
        """Poll without sleeping until ``spin_until``, then sleep in poll for up to 100 ms.

        A request that arrives while this thread spins finds it awake, on a warm core, instead of
        paying a wake-up. Each zero-timeout poll releases the GIL: the watcher thread is not held up.
        Returns "spinning" or "sleeping" (how the request was found), "" on a timeout.
        """
        while time.perf_counter() < spin_until:
            if poller.poll(0):
                return "spinning"
        return "sleeping" if poller.poll(100) else ""

    def _collect(self, router: zmq.Socket, model: LoadedModel | None) -> list[_Request]:
        """Drain queued requests into one batch of at most max_batch images (a single larger request alone).

        Waits up to max_wait_ms only if others are arriving too, and fast enough lately that another is
        expected within the wait. A request that would take the batch past max_batch is kept, and opens
        the next batch.
        """
        batch: list[_Request] = []
        count = 0
        deadline = None
        began = time.monotonic()
        if self._pending is not None:
            (request, parsed_for), self._pending = self._pending, None
            if parsed_for is not model:  # a swap in between: resize and cap top_k for the model that runs it
                request = self._parse(router, request.frames, model, count=False)
            if request is not None:
                batch.append(request)
                count += len(request.images)
        while count < self.serve.max_batch:
            # EVENTS rather than a non-blocking recv: no exception raised on the common "nothing more" path.
            if not router.get(zmq.EVENTS) & zmq.POLLIN:
                if len(batch) < 2 or self.serve.max_wait_ms <= 0:
                    break
                if deadline is None:
                    wait_s = self.serve.max_wait_ms / 1000
                    if self._arrivals.expected_within(wait_s, began, len(batch)) < 1:
                        break
                    self.counters["held_batches"] += 1
                    deadline = time.monotonic() + wait_s
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not router.poll(remaining * 1000):
                    break
                continue
            request = self._parse(router, router.recv_multipart(), model)
            if request is None:
                continue
            if batch and count + len(request.images) > self.serve.max_batch:
                self._pending = (request, model)
                break
            batch.append(request)
            count += len(request.images)
        self._arrivals.record(began, len(batch))
        return batch

    def _parse(self, router: zmq.Socket, frames: list[bytes], model: LoadedModel | None, count: bool = True) -> _Request | None:
        """Validate one request; an invalid one is answered with an error right away.

        Every error reply carries the request's seq when its header can be read (0 when it cannot).
        """
        split = frames.index(b"") + 1 if b"" in frames[:-1] else 1
        envelope, parts = frames[:split], frames[split:]
        if count:
            self.counters["requests"] += 1
        try:
            message = decode_message(parts, self.wire)
        except WireError as e:
            return self._refuse(router, envelope, peek_seq(parts, self.wire), e.reason, e.detail)
        if message.kind == "status":
            fields = {"model": self.repository.model_name, "model_version": self.version, **self.stats()}
            fields["model_optimized"] = model.optimized if model is not None else None  # opened from its optimised graph
            fields["model_providers"] = model.providers if model is not None else None  # what onnxruntime runs it with
            fields["image_size"] = model.image_size if model is not None else None  # its input: (size, size, 3)
            if message.header.get("reset_recent") is True:
                self.reset_recent()
            router.send_multipart(envelope + reply("status", SENDER, message.seq, **fields))
            return None
        if message.kind != "infer":
            return self._refuse(
                router, envelope, message.seq, "bad_kind", f"expected 'infer' or 'status', got {message.kind!r}"
            )
        if not message.payloads:
            return self._refuse(router, envelope, message.seq, "no_images", "an infer request needs at least one image")
        if model is None:
            return self._refuse(router, envelope, message.seq, "no_model", "no model version is loaded yet")
        top_k = message.header.get("top_k", self.serve.top_k)
        if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
            return self._refuse(router, envelope, message.seq, "bad_top_k", f"top_k must be an int >= 1, got {top_k!r:.50}")
        size = model.image_size
        batch = _raw_batch(message, size)
        if batch is None:
            try:
                images = [resize_to_input(message.image(i, self.wire), size) for i in range(len(message.payloads))]
            except WireError as e:
                return self._refuse(router, envelope, message.seq, e.reason, e.detail)
            batch = images[0][None] if len(images) == 1 else np.stack(images)  # (n, S, S, 3)
        return _Request(envelope, frames, message, batch, min(top_k, len(model.class_names)))

    def _refuse(self, router: zmq.Socket, envelope: list[bytes], seq: int, reason: str, detail: str) -> None:
        self.counters["errors"] += 1
        router.send_multipart(envelope + reply("error", SENDER, seq, reason=reason, detail=detail))
        return None

    def _run(self, router: zmq.Socket, model: LoadedModel, batch: list[_Request]) -> float:
        """Run one micro-batch and answer each request; returns the seconds spent in session.run.

        A single request with more than max_batch images runs in chunks of max_batch (TensorRT's
        profile ends there), joined into one reply.
        """
        images = batch[0].images if len(batch) == 1 else np.concatenate([r.images for r in batch])  # (N, S, S, 3)
        step = self.serve.max_batch
        started = time.perf_counter()
        try:
            chunks = [model.probabilities(images[i : i + step]) for i in range(0, len(images), step)]
            probs = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)  # (N, K)
        except Exception as e:  # onnxruntime raises untyped runtime errors; answer, count, keep serving
            log.error("inference failed on version %d: %s", model.version, e)
            for request in batch:
                self._refuse(router, request.envelope, request.message.seq, "inference_failed", str(e)[:500])
            return 0.0
        inference = time.perf_counter() - started
        self.counters["inference_s"] += inference
        self.counters["batches"] += len(chunks)
        self.counters["images"] += len(images)
        self.counters["largest_batch"] = max(self.counters["largest_batch"], min(len(images), step))
        ranked = _ranked(probs, max(r.top_k for r in batch))
        start = 0
        for request in batch:
            rows = ranked[start : start + len(request.images)]
            start += len(request.images)
            predictions = _predictions_json(rows, request.top_k, model.names_json)
            router.send_multipart(
                request.envelope + prediction_reply(SENDER, request.message.seq, self.repository.model_name, model.version, predictions)
            )
        return inference


class _IdleGaps:
    """Adaptive busy-polling: spin after a batch only while requests have been coming back quickly.

    Tracks the idle gap between the end of one batch and the arrival of the next (an
    exponential average, each gap capped at twice the window so one long pause does not
    dominate). While the average is shorter than the window (a client sending its next
    request as soon as it has the answer), the serving thread spins up to ``window_s`` after
    each batch; at a light or spaced-out load, where spinning would only burn CPU, it sleeps.
    """

    def __init__(self, window_s: float, weight: float = 0.2):
        self.window_s, self.weight = window_s, weight
        self.average_s = 2 * window_s  # start asleep: spin only after short gaps have been seen
        self._finished: float | None = None

    def arrived(self, now: float) -> None:
        if self._finished is not None:
            gap = min(now - self._finished, 2 * self.window_s)
            self.average_s += self.weight * (gap - self.average_s)
            self._finished = None

    def finished(self, now: float) -> None:
        self._finished = now

    def spin_until(self) -> float:
        if self._finished is None or self.average_s >= self.window_s:
            return 0.0
        return self._finished + self.window_s


class _ArrivalRate:
    """Requests per second over the last few micro-batches: is it worth holding a batch open for more?

    Each batch records when its collection began and how many requests it took. The requests
    that arrived since the oldest recorded batch began (the later batches' and those queued now),
    over that span, give the rate; a batch waits only if that rate brings at least one more request
    within the wait. A handful of batches, not the last one alone: two requests queued together
    say little about the rate, as they may have met by chance.
    """

    def __init__(self, batches: int = 8):
        self._batches: deque[tuple[float, int]] = deque(maxlen=batches)

    def record(self, began: float, requests: int) -> None:
        self._batches.append((began, requests))

    def expected_within(self, wait_s: float, now: float, queued: int) -> float:
        """How many more requests to expect in ``wait_s`` after ``now``.

        ``queued``: the requests of the batch being collected at ``now`` (they arrived after the last
        recorded batch began)."""
        if not self._batches:
            return 0.0  # nothing seen yet: no basis for waiting
        span = now - self._batches[0][0]
        if span <= 0:
            return 0.0
        arrived = queued + sum(n for _, n in list(self._batches)[1:])
        return arrived * wait_s / span


def _ranked(probs: np.ndarray, k: int) -> list[list[tuple[int, float]]]:
    """Per row of (N, K) probabilities, the k (class index, probability) pairs with the highest ones, best first.

    Up to 64 classes a plain sort of each row's Python list: right after a ``session.run`` has streamed the
    weights through the caches, numpy's sorting machinery costs more than the sort itself. Ties keep the
    lower class index first.
    """
    if probs.shape[1] <= 64:
        ranked = []
        for row in probs.tolist():
            order = sorted(range(len(row)), key=row.__getitem__, reverse=True)[:k]
            ranked.append([(c, row[c]) for c in order])
        return ranked
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    values = np.take_along_axis(probs, order, axis=1)
    return [list(zip(o, v)) for o, v in zip(order.tolist(), values.tolist())]


def _predictions_json(rows: list[list[tuple[int, float]]], top_k: int, names_json: list[str]) -> str:
    """``[[[name, probability], ...] per image]`` as JSON text, the top ``top_k`` of each ranked row.

    Classes the model was never trained on are left out: the exported graph masks them
    (``student.SeenClassMask``), so their probability is exactly 0, and they are outputs the
    model has no knowledge of (often placeholders named by their index). Only an exact 0 is left
    out (a broken model's NaN stays visible), and a row keeps at least its best class."""
    images = []
    for row in rows:
        kept = [(c, p) for c, p in row[:top_k] if p != 0] or row[:1]
        images.append("[" + ",".join(["[%s,%s]" % (names_json[c], json_number(p)) for c, p in kept]) + "]")
    return "[" + ",".join(images) + "]"


def _raw_batch(message: Message, size: int) -> np.ndarray | None:
    """(n, S, S, 3) read straight from raw RGB payloads already at the model's size, else None.

    The common case for a camera client that sends what the model takes: no per-image
    decode and, for one image, no copy (a read-only view of the received bytes). The
    payload lengths and sizes were checked by ``decode_message``.
    """
    if message.encoding != "raw" or message.color != "rgb":
        return None
    if any(shape != (size, size, 3) for shape in message.shapes):
        return None
    payloads = message.payloads
    data = payloads[0] if len(payloads) == 1 else b"".join(payloads)
    return np.frombuffer(data, np.uint8).reshape(len(payloads), size, size, 3)


def _why_no_model(repository: ModelRepository) -> str:
    """Say why nothing can be served yet, naming what is there (a wrong --repo or --model shows here)."""
    root, name = Path(repository.root), repository.model_name
    if not root.is_dir():
        return f"repository folder {root} does not exist (yet)"
    if not repository.model_dir.is_dir():
        others = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        there = f"models there: {', '.join(others)}" if others else "it holds no models yet"
        return f"no model {name!r} in {root} ({there})"
    return f"no complete version of {name!r} in {repository.model_dir} yet"


def served_summary(counters: dict) -> str:
    """``Server.counters`` as one line for the log, e.g. "12 requests (30 images in 9 batches, largest 8; 1 refused), ..."."""
    c = counters
    return (
        f"{c['requests']} requests ({c['images']} images in {c['batches']} batches, largest {c['largest_batch']}; "
        f"{c['errors']} refused), {c['swaps']} version swaps ({c['swap_failures']} refused), "
        f"{c['busy_s']:.2f} s busy ({c['inference_s']:.2f} s in inference)"
    )


def check_repository_root(root: str | Path, key: str, following: bool) -> None:
    """Refuse, naming ``key`` (a config key or an option), a repository folder this server can never use.

    A server reading the folder may start before it exists (the first publish makes it), as long
    as it can be made there: the nearest existing folder on its path must be a folder. A follower
    writes its mirror into it, so it creates the folder now and needs to be able to write there.
    """
    root = Path(root)
    where = f"{key} = {str(root)!r}"
    if root.exists() and not root.is_dir():
        raise CLAgentError(f"{where}: exists and is not a folder")
    if following:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CLAgentError(f"{where}: cannot create the folder: {e.strerror or e}") from None
        if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
            raise CLAgentError(f"{where}: the folder is not writable (a follower installs the versions it fetches there)")
        return
    if not root.exists():
        ancestor = next(p for p in root.absolute().parents if p.exists())
        if not ancestor.is_dir():
            raise CLAgentError(f"{where}: cannot be created: {ancestor} is not a folder")
        return
    if not os.access(root, os.R_OK | os.X_OK):
        raise CLAgentError(f"{where}: the folder is not readable")


def serve_forever(
    cfg: AgentConfig, repo: str | Path | None = None, model: str | None = None, stop_requested: threading.Event | None = None
) -> int:
    """``cl-agent serve``: serve until SIGINT/SIGTERM; returns the exit code (0 on a signal).

    Logging is the caller's to set up. ``stop_requested``: an event the caller's signal handlers
    set (``cl-agent serve``: ``entry.request_stop_on_signals``); serving stops when it is set, and
    no handler is installed here. Without it, SIGINT and SIGTERM get handlers for the time of
    serving, except a signal the caller ignores (SIG_IGN, e.g. SIGINT in the agent's hosted server),
    which stays ignored.
    """
    following = bool(cfg.serve.follow_fetch_endpoint)
    check_repository_root(repo or cfg.repository.root, "--repo" if repo else "repository.root", following)
    repository = ModelRepository(repo or cfg.repository.root, model or cfg.agent.model_name, cfg.repository.keep_last)
    from cl_agent.follower import follower_from_config

    # A follower's repository is local: the agent's announcements name versions that are not here yet.
    announce = None if following else cfg.repository.announce_endpoint
    server = Server(repository, cfg.serve, cfg.ingest.wire, announce_endpoint=announce)
    follower = follower_from_config(cfg.serve, cfg.repository.announce_endpoint, repository, on_install=lambda _: server.check_now())
    stopping = stop_requested if stop_requested is not None else threading.Event()
    metrics_server = None

    def on_signal(signum, frame) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stopping.set()

    previous = {} if stop_requested is not None else {
        s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) != signal.SIG_IGN
    }
    try:
        if follower is not None:
            follower.start()
            log.info("following %s into %s", cfg.serve.follow_fetch_endpoint, repository.model_dir)
        if cfg.serve.metrics_port:  # up before the first request is answered (a taken port fails before serving)
            from cl_agent.metrics import ServerMetrics, serve_registry

            metrics_server = serve_registry(ServerMetrics(server).registry, cfg.metrics.host, cfg.serve.metrics_port, "serve.metrics_port")
        server.start()
        if server.version is None:
            log.warning("%s: answering 'no_model' until one is published", _why_no_model(repository))
        while not stopping.wait(1.0):
            pass
        if stop_requested is not None:
            log.info("asked to stop (SIGINT or SIGTERM), stopping")
    finally:
        if metrics_server is not None:
            metrics_server.stop()
        server.stop()
        if follower is not None:
            follower.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
    log.info("stopped after %s", served_summary(server.counters))
    return 0
