"""The ingestion service: labeled batches into the durable spool, frames into the reservoir, experiences cut.

One background thread owns every socket and the spool:

    labeled ROUTER  --validate, decode--> plan class ids --> spool.append --> save new names ... spool.commit (one fsync) --> ack / nack
    frame PULL|SUB|ROUTER --validate--> reservoir (still encoded), drops counted from sequence gaps
    control REP     --> end_experience, status
    policy          --> cut an experience (labeled segment + a draw of frames), numbered, durable

A refused message is answered with a nack that carries the reason and is
counted per reason; nothing a sender does stops the loop. See docs/protocol.md.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import zmq

from cl_agent.config import (
    AgentConfig,
    ExperienceSection,
    IngestSection,
    ReservoirSection,
    SpoolSection,
)
from cl_agent.errors import CLAgentError, bind_failure
from cl_agent.experience import CUT_EXPLICIT, CUT_FULL, ExperiencePolicy, ExperienceStore, UntrainedBytes
from cl_agent.intake import AGENT_SENDER, Counters, EndRequest, LabeledIntake
from cl_agent.labels import LabelMap
from cl_agent.reservoir import SAVED_FILE as RESERVOIR_FILE, Frame, Reservoir, save_reservoir
from cl_agent.retention import TrainedRetention
from cl_agent.senders import FrameSenders
from cl_agent.spool import Spool
from cl_agent.wire import Message, WireError, decode_message, peek_seq, reply

log = logging.getLogger(__name__)

FRAME_DRAIN = 512  # frames handled per wake-up before the labeled socket gets a turn
POLL_MS = 50
SPOOL_RECOUNT_S = 1.0  # how often cut, untrained experiences are checked for the trainer's mark (training frees their bytes)

COUNTER_NAMES = (
    "labeled_messages",  # labeled-socket messages received
    "labeled_acked",  # messages acked (stored now or earlier)
    "labeled_images_acked",  # images newly made durable
    "labeled_duplicates",  # retried messages acked again without storing
    "labeled_nacked",  # messages refused
    "commits",  # fsync group commits
    "frames_received",  # frame-socket messages received
    "frames_accepted",  # frames that passed validation
    "frames_kept",  # frames that entered the reservoir
    "frames_rejected",  # frames refused by validation
    "frames_dropped",  # frames lost before reaching the agent (sequence gaps per sender)
    "frames_sender_clashes",  # frame sender ids whose seqs kept going back: two streams share the id (senders.py; at most once a minute per id)
    "control_messages",  # control-socket messages
    "control_accepted",  # end_experience messages acked (an experience cut), on the labeled or control socket
    "experiences_cut",  # experiences cut by this process
    "experiences_pruned",  # trained experiences whose data this process deleted (spool.keep_trained_bytes)
)


def bind(socket: zmq.Socket, endpoint: str, key: str = "") -> str:
    """Bind, accepting port 0 for "any free port"; returns the endpoint actually bound.

    ``key``: the config key that chose the endpoint, named in the error."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        endpoint = endpoint[:-2] + ":*"
    try:
        socket.bind(endpoint)
    except zmq.ZMQError as e:
        raise bind_failure(f"cannot bind {key + ' ' if key else ''}{endpoint}", e) from None
    return socket.getsockopt_string(zmq.LAST_ENDPOINT)


def make_workdir(path: str | Path, key: str = "agent.workdir") -> Path:
    """Create the working directory (and its parents); CLAgentError naming the path if that is impossible."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CLAgentError(f"{key} = {str(path)!r}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLAgentError(f"{key} = {str(path)!r}: cannot create the folder: {e.strerror or e}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise CLAgentError(f"{key} = {str(path)!r}: the folder is not writable")
    return path


def split_envelope(parts: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """ROUTER messages: [identity, (empty delimiter from REQ/our DEALER client), body...]."""
    if len(parts) >= 2 and parts[1] == b"":
        return parts[:2], parts[2:]
    return parts[:1], parts[1:]


class IngestService:
    """Runs the ingestion loop in a background thread with its own zmq context."""

    def __init__(
        self,
        ingest: IngestSection,
        spool: SpoolSection,
        reservoir: ReservoirSection,
        experience: ExperienceSection,
        workdir: str | Path,
        *,
        seed: int = 0,
        on_experience: Callable[[int], None] | None = None,
    ):
        self.config = ingest
        self.wire = ingest.wire
        self.spool_config = spool
        self.experience_config = experience
        self.workdir = make_workdir(workdir)
        self.store = ExperienceStore(self.workdir)
        try:
            self.labels = LabelMap(self.workdir / "labels.json", spool.max_classes, spool.classes)
        except (OSError, UnicodeDecodeError, ValueError) as e:  # written atomically: damaged by hand or disk
            raise CLAgentError(f"cannot read the class names {self.workdir / 'labels.json'}: {e}") from None
        self.reservoir = Reservoir(reservoir.capacity, reservoir.per_source, seed, reservoir.max_sources)
        self.reservoir.restore(self.workdir / RESERVOIR_FILE)  # the frames held at the last clean stop
        self.policy = ExperiencePolicy(experience)
        self.on_experience = on_experience
        self.endpoints: dict[str, str] = {}
        self.spool: Spool | None = None
        self.untrained: UntrainedBytes | None = None  # running total of cut, untrained spool bytes
        self.retention: TrainedRetention | None = None  # bounds the disk the trained experiences' data takes
        self._counters = Counters(COUNTER_NAMES)
        self.intake: LabeledIntake | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._requests: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None  # a failure to start
        self._failure: BaseException | None = None  # a failure of the running loop
        self._frame_senders = FrameSenders()  # last seq per frame sender: drops, and ids two streams share
        self._auth = None

    # ---------------------------------------------------------------- lifecycle

    def start(self, timeout_s: float = 30.0) -> "IngestService":
        """Open the spool, bind the sockets and start the loop; raises if any of that fails."""
        self._thread = threading.Thread(target=self._run, name="ingest", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise CLAgentError(f"ingest did not start within {timeout_s} s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            if not self._thread.is_alive():  # the loop no longer adds frames: keep them for the next start
                save_reservoir(self.reservoir, self.workdir / RESERVOIR_FILE)
            self._thread = None

    def __enter__(self) -> "IngestService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def end_experience(self, timeout_s: float = 10.0) -> int | None:
        """Cut the open experience now (from any thread); returns its index, or None if it holds no samples."""
        done = threading.Event()
        result: list = []
        self._requests.put((done, result))
        if not done.wait(timeout_s):
            raise CLAgentError(f"ingest loop did not answer end_experience within {timeout_s} s")
        return result[0]

    def counters(self) -> dict:
        """Counts since start (see COUNTER_NAMES) plus current sizes; ``rejected`` maps reason -> count."""
        out = self._counters.snapshot()
        spool = self.spool
        out["reservoir_frames"] = len(self.reservoir)
        out["reservoir_bytes"] = self.reservoir.nbytes
        out["label_classes"] = len(self.labels)
        if spool is not None:
            out["spool_bytes"] = spool.size_bytes
            out["open_experience"] = spool.segment
            out["open_experience_samples"] = spool.samples
        if self.retention is not None:
            out["trained_data_bytes"] = self.retention.total
        return out

    # ---------------------------------------------------------------- thread

    def _run(self) -> None:
        try:
            self._setup()
        except BaseException as e:  # reported to start() in the caller's thread
            self._error = e
            self._teardown()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 - e.g. the disk refused an experience: the owner sees failure and stops
            log.exception("ingestion stopped: %s", e)
            self._failure = e
        finally:
            self._teardown()

    @property
    def failure(self) -> BaseException | None:
        """Why the running loop died (no socket is served any more), None while it is healthy."""
        return self._failure

    def _refuse_lost_labels(self, cut: list[int]) -> None:
        """labels.json missing or empty while stored samples carry class ids: the map was lost (deleted or
        emptied). Starting would name the outputs '0', '1', ... (or spool.classes, in its order) and give
        class names ids that were trained as other classes, so the start is refused with the ways to recover."""
        path = self.workdir / "labels.json"
        where = None
        for index in cut:  # the first experience with labeled samples is usually the first one
            if self.store.meta(index).get("classes"):
                where = f"experience {index} holds labeled samples"
                break
        if where is None and self.spool.samples:
            where = f"the open experience {self.spool.segment} holds {self.spool.samples} labeled samples"
        if where is None:
            return
        state = "is missing" if not path.exists() else "holds no class names"
        fixed = (
            " (spool.classes does not stand in for it: it gives ids in its order, not necessarily the trained ones)"
            if self.labels.classes else ""
        )
        raise CLAgentError(
            f"{path} {state}, but {where}: starting would give class names the ids of other classes "
            f"already trained{fixed}. Restore labels.json from a backup, or rebuild it from the newest "
            f"published version's manifest: `cl-agent labels restore --config CONFIG` (the agent's config "
            f"file: it names the working directory and the repository; or `--workdir {self.workdir} --repo "
            f"REPOSITORY_ROOT`) (`cl-agent models show` prints that manifest, class_names in output "
            f"order); to start over instead, move the working directory away"
        )

    def _refuse_shrunk_labels(self) -> None:
        """Stored samples with class ids past the names the map holds: labels.json was replaced by an older
        copy (a backup from before those classes arrived). The map is saved before any sample using a new
        class is stored, so this never happens otherwise. Checked where new ids appear: the untrained
        experiences and the open one (the trainer checks the trained ones against the published names)."""
        where = {}
        for index in self.untrained.sizes:
            for class_id in self.store.meta(index).get("classes") or ():
                where.setdefault(class_id, f"experience {index}")
        for class_id in self.spool.segment_classes:
            where.setdefault(class_id, f"the open experience {self.spool.segment}")
        beyond = sorted(i for i in where if i >= len(self.labels))
        if beyond:
            raise CLAgentError(
                f"{self.workdir / 'labels.json'} holds {len(self.labels)} class names, but {where[beyond[-1]]} holds "
                f"samples of class id {beyond[-1]}: it is an older copy than the stored samples, and starting would "
                "give new class names the ids of classes already stored. Restore the newest labels.json from a backup; "
                "or move it away and rebuild it with `cl-agent labels restore` (classes newer than the published "
                "version are then named by their ids)"
            )

    def _setup(self) -> None:
        cfg = self.config
        cut = self.store.indices()  # listed once for the whole start
        self.store.discard_unfinished_writes()  # a key summary half written when the last process was killed
        self.untrained = UntrainedBytes(self.store, cut)  # cuts and trained marks keep it up to date from here on
        # Marked trained later (by the trainer, meanwhile): refresh() finds it and retention adds it then.
        trained = [i for i in cut if i not in self.untrained.sizes]
        self.retention = TrainedRetention(self.store, self.spool_config.keep_trained_bytes, trained)  # may delete at once
        self._counters.add("experiences_pruned", self.retention.pruned)
        self.spool = Spool(
            self.workdir / "spool",
            cut[-1] + 1 if cut else 0,
            self.spool_config.max_bytes,
            closed_bytes=self.untrained.total,
            keys=self.store.committed_keys(cut),
        )
        if self.labels.stored == 0:  # not len(): spool.classes fills the map when labels.json is missing
            self._refuse_lost_labels(cut)
        else:
            self._refuse_shrunk_labels()
        self.intake = LabeledIntake(self.spool, self.labels, self.wire, self._counters, self.untrained.refresh)
        self.context = zmq.Context()
        if cfg.curve.enabled:
            from cl_agent.security import start_authenticator

            if cfg.frame_connect:
                raise CLAgentError("ingest.frame_connect cannot be used with curve.enabled (CURVE covers bound endpoints)")
            self._auth = start_authenticator(self.context, cfg.curve)

        def server_socket(kind: int) -> zmq.Socket:
            socket = self.context.socket(kind)
            socket.linger = 0
            # A part far larger than any accepted message ends the connection before it fills memory.
            socket.maxmsgsize = self.wire.max_message_bytes
            if cfg.curve.enabled:
                from cl_agent.security import make_server

                try:
                    make_server(socket, cfg.curve)
                except CLAgentError:
                    socket.close(linger=0)  # an open socket would block context.term()
                    raise
            return socket

        # Attributes are set before binding, so _teardown closes a socket whose bind failed.
        self.labeled_socket = server_socket(zmq.ROUTER)
        # Per sender: a few groups queued at most; past that TCP pushes back and the client waits (nothing is lost).
        self.labeled_socket.rcvhwm = 2 * cfg.max_batch_messages
        self.endpoints["labeled"] = bind(self.labeled_socket, cfg.labeled_endpoint, "ingest.labeled_endpoint")

        frame_kind = {"pull": zmq.PULL, "sub": zmq.SUB, "router": zmq.ROUTER}[cfg.frame_socket]
        self.frame_socket = server_socket(frame_kind)
        self.frame_socket.rcvhwm = cfg.frame_hwm
        if cfg.frame_socket == "sub":
            self.frame_socket.setsockopt(zmq.SUBSCRIBE, b"")
        if cfg.frame_endpoint:
            self.endpoints["frames"] = bind(self.frame_socket, cfg.frame_endpoint, "ingest.frame_endpoint")
        for endpoint in cfg.frame_connect:
            self.frame_socket.connect(endpoint)

        self.control_socket = None
        if cfg.control_endpoint:
            self.control_socket = server_socket(zmq.REP)
            self.endpoints["control"] = bind(self.control_socket, cfg.control_endpoint, "ingest.control_endpoint")

    def _teardown(self) -> None:
        for name in ("labeled_socket", "frame_socket", "control_socket"):
            socket = getattr(self, name, None)
            if socket is not None:
                socket.close(linger=0)
                setattr(self, name, None)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if getattr(self, "context", None) is not None:
            self.context.term()
            self.context = None
        if self.intake is not None:
            self.intake.close()
        if self.spool is not None:
            self.spool.close()

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.labeled_socket, zmq.POLLIN)
        poller.register(self.frame_socket, zmq.POLLIN)
        if self.control_socket is not None:
            poller.register(self.control_socket, zmq.POLLIN)
        last_recount = time.monotonic()
        while not self._stop.is_set():
            events = dict(poller.poll(POLL_MS))
            if self.labeled_socket in events:
                self._handle_labeled()
            if self.frame_socket in events:
                self._handle_frames()
            if self.control_socket is not None and self.control_socket in events:
                self._handle_control()
            self._serve_requests()
            reason = self.policy.reason_to_cut(self.spool.samples, self.spool.first_ts)
            refused_full, self.intake.refused_full = self.intake.refused_full, False
            if reason is None and refused_full and self.spool.closed_bytes == 0:
                # Nothing cut waits for training, so nothing will ever free space but cutting the open
                # experience (otherwise every sender is refused until max_wait_s, or for ever below min_samples).
                reason = CUT_FULL
            if reason is not None:
                self._cut(reason)
            if time.monotonic() - last_recount >= SPOOL_RECOUNT_S:
                # spool_bytes reports what counts against spool.max_bytes: it falls as experiences are trained
                self.spool.closed_bytes = self.untrained.refresh()
                self._counters.add("experiences_pruned", len(self.retention.add(self.untrained.take_trained())))
                last_recount = time.monotonic()

    # ---------------------------------------------------------------- labeled path

    def _receive_batch(self) -> list[list[bytes]]:
        """Drain what has arrived, waiting up to group_commit_ms for more (one fsync covers the batch)."""
        batch: list[list[bytes]] = []
        deadline = None
        wait_s = self.spool_config.group_commit_ms / 1000.0
        while len(batch) < self.config.max_batch_messages:
            try:
                batch.append(self.labeled_socket.recv_multipart(zmq.NOBLOCK))
                continue
            except zmq.Again:
                pass
            if wait_s <= 0:
                break
            now = time.monotonic()
            deadline = deadline or now + wait_s
            if now >= deadline or not self.labeled_socket.poll((deadline - now) * 1000):
                break
        return batch

    def _handle_labeled(self) -> None:
        received = [split_envelope(raw) for raw in self._receive_batch()]
        answers = self.intake.process([body for _, body in received])
        for (envelope, _), answer in zip(received, answers):
            if isinstance(answer, EndRequest):
                answer = self._end_reply(answer.seq)
            self._send(self.labeled_socket, envelope, answer)

    @staticmethod
    def _send(socket: zmq.Socket, envelope: list[bytes], parts: list[bytes]) -> None:
        try:
            socket.send_multipart(envelope + parts, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("reply dropped: peer not reachable")

    # ---------------------------------------------------------------- frames

    def _handle_frames(self) -> None:
        router = self.config.frame_socket == "router"
        counts = dict.fromkeys(
            ("frames_received", "frames_rejected", "frames_accepted", "frames_kept", "frames_dropped", "frames_sender_clashes"), 0
        )
        try:
            for _ in range(FRAME_DRAIN):
                try:
                    # Zero-copy: payloads stay in zmq's buffers; only frames the reservoir keeps are retained.
                    raw = [part.buffer for part in self.frame_socket.recv_multipart(zmq.NOBLOCK, copy=False)]
                except zmq.Again:
                    return
                counts["frames_received"] += 1
                envelope, body = split_envelope([bytes(p) for p in raw[:2]] + raw[2:]) if router else ([], raw)
                answer = b"OK"
                try:
                    message = decode_message(body, self.wire)
                    if message.kind != "frame":
                        raise WireError("unexpected_kind", f"kind {message.kind!r} on the frame socket")
                except WireError as e:
                    self._counters.reject(e.reason)
                    counts["frames_rejected"] += 1
                    answer = f"ERROR {e.reason}".encode()
                else:
                    self._keep_frames(message, counts)
                if router:
                    # imagezmq's REQ sender waits for exactly one reply part.
                    self._send(self.frame_socket, envelope, [answer])
        finally:
            self._counters.add_many(counts)  # one update per drained burst, not three per frame

    def _keep_frames(self, message: Message, counts: dict) -> None:
        if "v" in message.header:
            dropped, clash = self._frame_senders.observe(message.sender, message.seq)
            counts["frames_dropped"] += dropped
            counts["frames_sender_clashes"] += clash
        for payload, shape in zip(message.payloads, message.shapes):
            counts["frames_kept"] += self.reservoir.add(Frame(payload, message.encoding, shape, message.color, message.sender))
        counts["frames_accepted"] += len(message.payloads)

    # ---------------------------------------------------------------- control and experiences

    def _handle_control(self) -> None:
        try:
            body = self.control_socket.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return
        self._counters.add("control_messages")
        try:
            message = decode_message(body, self.wire)
        except WireError as e:
            self._counters.reject(e.reason)
            answer = reply("nack", AGENT_SENDER, peek_seq(body, self.wire), reason=e.reason, detail=e.detail)
        else:
            if message.kind == "end_experience":
                answer = self._end_reply(message.seq)
            elif message.kind == "status":
                answer = reply("status", AGENT_SENDER, message.seq, counters=self.counters())
            else:
                self._counters.reject("unexpected_kind")
                answer = reply("nack", AGENT_SENDER, message.seq, reason="unexpected_kind", detail=f"kind {message.kind!r} on the control socket")
        self.control_socket.send_multipart(answer)  # REP: exactly one answer per request

    def _end_reply(self, seq: int) -> list[bytes]:
        """Cut the open experience for an end_experience message and say which one it was."""
        index = self._cut(CUT_EXPLICIT)
        if index is None:
            self._counters.reject("nothing_to_cut")
            return reply("nack", AGENT_SENDER, seq, reason="nothing_to_cut", detail="the open experience has no samples")
        self._counters.add("control_accepted")
        return reply("ack", AGENT_SENDER, seq, experience=index)

    def _serve_requests(self) -> None:
        while True:
            try:
                done, result = self._requests.get_nowait()
            except queue.Empty:
                return
            result.append(self._cut(CUT_EXPLICIT))
            done.set()

    def _cut(self, reason: str) -> int | None:
        """Cut the open experience (its records are already durable); returns its index, None if empty."""
        spool = self.spool
        if spool.samples == 0:
            return None
        index = spool.segment
        frames = self.reservoir.sample(self.experience_config.unlabeled_samples)
        self.store.write(
            index,
            labeled_segment=spool.segment_path(index).name,
            labeled_samples=spool.samples,
            keys=spool.segment_keys,
            unlabeled=frames,
            reason=reason,
            classes=spool.segment_classes,
        )
        _, _, size = spool.cut()
        self.untrained.add(index, size)
        try:  # the keys of every experience up to this one (the new segment's are not committed yet)
            self.store.save_keys(index, spool.keys)
        except OSError as e:  # a shortcut for the next start only: without it, that start reads every meta.json
            log.warning("cannot save the experiences' key summary: %s", e)
        self._counters.add("experiences_cut")
        log.info("experience %d cut (%s): %d labeled, %d unlabeled", index, reason, self.store.meta(index)["labeled_samples"], len(frames))
        if self.on_experience is not None:
            self.on_experience(index)
        return index


def run_ingest(config: AgentConfig) -> int:
    """Run only the ingestion half until SIGINT/SIGTERM; prints the bound endpoints as one JSON line."""
    from cl_agent.storage import lock_workdir
    from cl_agent.config import save_resolved
    from cl_agent.logs import setup_logging

    # The agent's formats (ISO 8601 UTC times, text or JSON lines), not logging's default asctime.
    setup_logging(config.agent.log_level, config.agent.log_json)
    workdir = make_workdir(config.agent.workdir)
    lock = lock_workdir(workdir)  # first: a workdir an agent runs in is refused (exit 75) before anything is written
    try:
        service = IngestService(
            config.ingest, config.spool, config.reservoir, config.experience, workdir, seed=config.agent.seed
        )
        save_resolved(config, workdir / "ingest-config.yaml")
        stop = threading.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda *_: stop.set())
        service.start()
        print(json.dumps({"event": "ingest_ready", "endpoints": service.endpoints}), flush=True)
        log.info("ingest listening (no training; Ctrl-C stops): %s; working directory %s",
                 ", ".join(f"{k}={v}" for k, v in service.endpoints.items()), workdir.resolve())
        while not stop.wait(0.5) and service.failure is None:
            pass
        service.stop()
        counters = service.counters()
        print(json.dumps({"event": "ingest_stopped", "counters": counters}), flush=True)
        log.info("ingest stopped: labeled images acked %d (messages refused %d), frames received %d, kept %d, "
                 "experiences cut %d", counters["labeled_images_acked"], counters["labeled_nacked"],
                 counters["frames_received"], counters["frames_kept"], counters["experiences_cut"])
    finally:
        lock.close()
    if service.failure is not None:
        raise CLAgentError(f"ingestion failed: {type(service.failure).__name__}: {service.failure}")
    return 0
