"""``cl-agent run``: one process tree for the whole product.

- this process: ingestion (sockets, spool, reservoir, experiences), /metrics,
  ``state.json`` heartbeat, the live view, signal handling;
- a trainer process: the update loop (``cl_agent.updater``), which reads only
  durable experiences, so ingestion never waits for training;
- optionally a serving process (``agent.host_server``), which shares nothing
  with the trainer but the model repository.

Children die with this process (PR_SET_PDEATHSIG on Linux, plus a parent check),
so a restarted agent never races an orphaned trainer.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from pathlib import Path

from cl_agent.config import (
    AgentConfig,
    AgentSection,
    ExperienceSection,
    ModelSection,
    ServeSection,
    TrainSection,
    connect_endpoint,
    save_resolved,
)
from cl_agent.errors import BusyError, CLAgentError
from cl_agent.storage import lock_workdir

log = logging.getLogger("cl_agent.agent")

RESOLVED_CONFIG = "config.yaml"
SERVER_UP_S = 10.0  # a restarted hosted server alive this long counts as running when nothing asks it
PUBLISHED_POLL_S = 1.0  # the repository's newest version is read again this often (rollbacks, other publishers)


# --------------------------------------------------------------------------- warnings


def slow_training_warning(
    agent: AgentSection, train: TrainSection, experience: ExperienceSection, model: ModelSection, cuda_available: bool,
    serve: ServeSection | None = None,
) -> str | None:
    """A warning when the updates will train on the CPU with no time limit, naming the planned work; else None.

    The default schedule (train.epochs_base epochs at the first experience) is sized for a GPU; how long
    a step takes on a CPU is not known before the first steps run (``long_update_warning`` judges that
    pace), so the warning names the planned steps, not a duration. ``serve``: the config's serve section;
    one that follows an agent on another machine (``serve.follow_fetch_endpoint``) is a serving machine's
    config, which trains nothing: no warning."""
    from cl_agent.method import epochs_for, steps_per_epoch

    if serve is not None and serve.follow_fetch_endpoint:
        return None
    on_cpu = agent.device == "cpu" or (agent.device == "auto" and not cuda_available)
    if not on_cpu or train.time_budget_s > 0:
        return None
    epochs = epochs_for(train, 0)
    per_epoch = steps_per_epoch(experience.labeled_samples, train.labeled_batch)
    device = "agent.device = 'cpu'" if agent.device == "cpu" else "agent.device = 'auto' and no CUDA on this machine"
    from cl_agent.status import duration_text

    return (
        f"updates train on the CPU ({device}) with no time limit (train.time_budget_s = 0): the first update "
        f"plans up to {epochs * per_epoch} steps ({epochs} epochs x {per_epoch} batches of train.labeled_batch "
        f"{train.labeled_batch} from experience.labeled_samples {experience.labeled_samples}; fewer for an "
        f"experience cut early) of "
        f"{model.backbone} at {model.image_size} px; how long that takes depends on the step count and the CPU "
        f"(the agent warns again once the pace of the first steps puts an update at {duration_text(SLOW_UPDATE_S)} "
        "or more), nothing limits it, and a stop abandons the update under way. Set train.time_budget_s (seconds "
        "per update, e.g. 600) or lower train.epochs_base and train.epochs_min"
    )


SLOW_UPDATE_S = 1800.0  # an update projected to train this long with no time budget is warned about


def long_update_warning(snapshot: dict | None, train: TrainSection, slow_s: float = SLOW_UPDATE_S) -> str | None:
    """A warning when the update under way, with no time limit, will train for ``slow_s`` or more at the pace
    of its steps so far (``UpdateProgress.snapshot``); else None (or while its pace is not known yet).

    Judged on the experience actually trained, its planned steps and the measured time per step, not on the
    config's largest experience: an update cut early, or a fast machine, is not warned about."""
    if snapshot is None or train.time_budget_s > 0 or snapshot.get("phase") != "training":
        return None
    eta, step, steps, elapsed = (snapshot.get(k) for k in ("eta_s", "step", "steps", "elapsed_s"))
    if eta is None or not step or not steps or elapsed + eta < slow_s:
        return None
    from cl_agent.status import duration_text

    return (
        f"the update of experience {snapshot.get('experience')} plans {steps} steps and, at the pace of its first "
        f"{step}, trains for about {duration_text(elapsed + eta)} with no time limit (train.time_budget_s = 0); "
        "a stop abandons the update under way. Set train.time_budget_s (seconds per update, e.g. 600) "
        "or lower train.epochs_base and train.epochs_min"
    )


# --------------------------------------------------------------------------- start checks


def check_trainer_start(cfg: AgentConfig) -> None:
    """The trainer's own start checks (the device, ``updater.check_start``), run by the agent before it
    opens ingestion: a configuration the trainer would refuse stops the agent before it acks anything.
    Raises CLAgentError naming the problem; the trainer logs their warnings when it starts."""
    from cl_agent.device import resolve_device
    from cl_agent.updater import check_start

    resolve_device(cfg.agent.device, "agent.device")
    check_start(cfg)


# --------------------------------------------------------------------------- child processes


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux); elsewhere rely on polling."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def quiet_libraries() -> None:
    """The ONNX exporter logs every optimisation pass at INFO; keep the agent's log readable."""
    for name in ("onnx_ir", "onnxscript", "torch.onnx", "torch._dynamo", "torch.export"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _child_logging(cfg: AgentConfig, name: str, to_stderr: bool) -> None:
    """A child logs to its own file in the workdir, and to stderr unless the parent draws a live view there."""
    from cl_agent.logs import setup_logging

    stream = None if to_stderr else open(os.devnull, "w")
    setup_logging(cfg.agent.log_level, cfg.agent.log_json, file=Path(cfg.agent.workdir) / name, stream=stream,
                  max_bytes=cfg.agent.log_max_bytes, backups=cfg.agent.log_backups)
    quiet_libraries()


def _trainer_main(cfg: AgentConfig, stop, results: mp.Queue, parent_pid: int, to_stderr: bool = True) -> None:
    """The trainer process. ``stop``: the read end of a pipe; a message or the parent closing it (or
    dying) means stop. A pipe rather than an ``mp.Event``: a process killed inside ``Event.wait``
    leaves the event's internal semaphores so that the next ``set()`` blocks for ever."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop (via ``stop``)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from cl_agent.updater import TrainerSetupError, update_loop

    _child_logging(cfg, "trainer.log", to_stderr)
    flag = threading.Event()

    def watch() -> None:  # mirror the stop pipe and the parent's liveness into a thread event
        while not flag.is_set():
            if stop.poll(0.2) or os.getppid() != parent_pid:
                flag.set()

    threading.Thread(target=watch, daemon=True).start()

    def on_result(result) -> None:
        results.put(result.record)

    def on_progress(info: dict) -> None:
        try:
            results.put_nowait({"progress": info})
        except queue.Full:
            pass

    try:
        update_loop(cfg, flag, on_result=on_result, on_progress=on_progress)
    except TrainerSetupError as error:  # a configuration problem: the parent stops instead of restarting
        results.put({"error": str(error), "fatal": True})  # the parent logs it (once, not here too)
        raise SystemExit(2) from None
    except Exception as error:  # noqa: BLE001 - report to the parent, which logs and restarts
        log.exception("trainer failed")
        results.put({"error": f"{type(error).__name__}: {error}"})
        raise SystemExit(1) from None


def _server_main(cfg: AgentConfig, parent_pid: int, to_stderr: bool = True, report=None) -> None:
    """The hosted server. Exit 1 when a restart may help (serve.endpoint taken, say), 2 when the
    configuration cannot work (a provider that is not installed); either way the reason is sent on
    ``report`` (the agent shows it in state.json and ``cl-agent status``)."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from cl_agent.server import serve_forever

    def tell(reason: str) -> None:
        if report is not None:
            report.send(reason)

    _child_logging(cfg, "server.log", to_stderr)
    try:
        code = serve_forever(cfg)
    except BusyError as error:  # one line, not a traceback per restart
        log.error("server cannot run: %s", error)
        tell(str(error))
        code = 1
    except CLAgentError as error:
        log.error("server cannot run: %s", error)
        tell(str(error))
        code = 2
    except Exception as error:  # noqa: BLE001 - logged with its traceback; the parent restarts the server
        log.exception("server failed")
        tell(f"{type(error).__name__}: {error}")
        code = 1
    raise SystemExit(code)


# --------------------------------------------------------------------------- the agent


def install_stop_handlers(stop_requested: threading.Event, again=None) -> None:
    """SIGINT and SIGTERM set ``stop_requested`` (a clean stop, exit 0) instead of killing the process.

    ``again``: called on a signal that comes while the stop is under way (a second Ctrl-C), which changes
    nothing else: the stop goes on as planned."""

    def handle(*_) -> None:
        if again is not None and stop_requested.is_set():
            again()
        stop_requested.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)


class Agent:
    def __init__(self, cfg: AgentConfig, view=None, stop_requested: threading.Event | None = None):
        """``stop_requested``: an event the caller's signal handlers already set (see ``run_agent``)."""
        self.cfg = cfg
        self.view = view  # cl_agent.console.LiveView, or None
        self.children_log_to_stderr = not (view is not None and view.tty)
        self.workdir = Path(cfg.agent.workdir)
        self.ctx = mp.get_context("spawn")
        self.stop_requested = stop_requested if stop_requested is not None else threading.Event()
        self.trainer: mp.Process | None = None
        self.server: mp.Process | None = None
        self.server_report = None  # read end of the hosted server's pipe (see _server_main)
        self.served_watch: threading.Thread | None = None  # asks the hosted server which version it serves
        self.fetch_service = None  # cl_agent.fetch.ModelFetchService, in this process
        self.trainer_stop = None  # write end of the running trainer's stop pipe
        self.results: mp.Queue | None = None  # the running trainer's results (both new for each trainer process)
        self.trainer_restarts = 0
        self._warned: set[str] = set()  # the trainer's warnings logged already (each once, not per restart)
        self._long_update_warned = False  # long_update_warning logged already (once per run)
        self.exit_code = 0  # set when the agent stops itself on a failure
        self.server_restarts = 0
        self._server_started = 0.0  # monotonic time the running server process was started
        self._server_answered = 0.0  # monotonic time the served-version watch last got an answer
        self._restart_at: dict[str, float] = {}  # child name -> monotonic time of its scheduled restart
        self._lock_file = None
        self._stop_deadline: float | None = None  # monotonic time the children are killed, once the stop is under way
        from cl_agent.status import UpdateProgress

        self.progress = UpdateProgress(cfg.train.time_budget_s)  # the update under way, from the trainer's messages
        self.metrics = None  # the AgentMetrics of the running agent (``run``)

    # ------------------------------------------------------------------ lifecycle

    def _lock(self) -> None:
        self._lock_file = lock_workdir(self.workdir)

    def _still_stopping(self) -> None:
        """A signal during the stop: say what the stop waits for, and for how long at most."""
        if self.trainer is None:  # still starting up: it stops before it starts the trainer
            log.warning("still stopping: the start-up ends, then the agent stops without starting the trainer "
                        "(kill -9 to stop now; nothing acked is lost)")
            return
        grace = self.cfg.agent.grace_period_s
        left = grace if self._stop_deadline is None else max(0.0, self._stop_deadline - time.monotonic())
        log.warning("still stopping: waiting for the trainer to end the update step, export or publish under way, "
                    "up to %.0f s left before it is killed (kill -9 to stop now; nothing acked is lost)", left)

    def _refuse_start(self, error: CLAgentError) -> int:
        """A start check failed (``check_trainer_start``): stop before ingestion opens, exit 2, the reason in state.json."""
        from cl_agent.status import initial_state, write_state

        state = initial_state(metrics_host=self.cfg.metrics.host)
        state.update(status="stopped", update=None, stop_error=f"trainer cannot start: {error}")
        log.error("%s; stopping (restarting it would fail the same way)", state["stop_error"])
        write_state(self.workdir, state)
        if self.view is not None:
            self.view.close()
        return 2

    def _watch_served_version(self, state: dict, metrics, view) -> None:
        """Ask the hosted server which version it serves (a thread: a slow server never stalls ingestion)."""
        from cl_agent.inference import InferenceClient

        endpoint = connect_endpoint(self.cfg.serve.endpoint)
        try:
            client = InferenceClient(endpoint, timeout_s=1.0, retries=0, sender="agent-watch")
        except CLAgentError as e:  # e.g. a random port (tcp://HOST:*): nothing to connect to
            log.warning("the served version is not watched (serve.endpoint %s): %s", self.cfg.serve.endpoint, e)
            return
        try:
            stopping = False
            while not stopping:
                # Once more when the agent stops (before its server does), so the last state.json is current.
                stopping = self.stop_requested.wait(self.cfg.metrics.state_interval_s)
                try:
                    version = client.status().get("model_version")
                except CLAgentError:
                    continue  # starting, restarting or busy: try again next time
                self._server_answered = time.monotonic()  # _supervise clears server_failure if it is the new process
                if version is not None and version != state.get("served_version"):
                    state["served_version"] = version
                    metrics.set_served_version(version)
                    if view is not None:
                        view.update({"served_version": version})
        finally:
            client.close()

    def _repository(self):
        from cl_agent.repository import ModelRepository

        return ModelRepository(self.cfg.repository.root, self.cfg.agent.model_name)

    def _latest_version(self) -> int | None:
        return self._repository().latest_version()

    def _refresh_hold(self, state: dict) -> None:
        """``publishing_hold``: the hold on publishing (``cl-agent models hold``) as its file says, or null."""
        from cl_agent.status import hold_fields

        try:
            hold = self._repository().publishing_hold()
        except OSError:  # _refresh_published warns about an unreadable repository
            return
        state["publishing_hold"] = hold_fields(hold)

    def _refresh_published(self, state: dict, metrics, view) -> None:
        """``published_version`` (and its older name ``model_version``): the repository's newest version.

        Read from the repository, not from the trainer's results: a rollback (which publishes an
        older model as a new version) or another publisher changes it too."""
        self._refresh_hold(state)
        try:
            version = self._latest_version()
        except OSError as e:  # an unreadable repository folder: keep the last known value
            log.warning("cannot read the model repository %s: %s", self.cfg.repository.root, e)
            return
        if version == state.get("published_version") and "published_version" in state:
            return
        state["published_version"] = state["model_version"] = version
        if version is not None:
            metrics.set_published_version(version)
        if view is not None:
            view.update({"published_version": version})

    def _start_trainer(self) -> None:
        # A new pipe and queue for each trainer: one that was killed may have died holding the old
        # queue's lock or inside a read of the old pipe.
        receive, self.trainer_stop = self.ctx.Pipe(duplex=False)
        self.results = self.ctx.Queue(maxsize=1000)
        self.trainer = self.ctx.Process(
            target=_trainer_main,
            args=(self.cfg, receive, self.results, os.getpid(), self.children_log_to_stderr),
            name="cl-agent-trainer",
        )
        self.trainer.start()
        receive.close()  # the child has its own copy: EOF here means the parent is gone

    def _start_server(self) -> None:
        if self.server_report is not None:  # the previous process's pipe: read already (see _server_exit_reason)
            self.server_report.close()
        self.server_report, report = self.ctx.Pipe(duplex=False)  # why it cannot run, sent before it exits
        self._server_started = time.monotonic()
        self.server = self.ctx.Process(
            target=_server_main, args=(self.cfg, os.getpid(), self.children_log_to_stderr, report), name="cl-agent-server"
        )
        self.server.start()
        report.close()

    def _start_fetch_service(self) -> None:
        """Serve the repository's versions to servers on other machines (``cl-agent serve --follow``)."""
        from cl_agent.fetch import ModelFetchService
        from cl_agent.repository import ModelRepository

        cfg = self.cfg
        if not cfg.repository.fetch_endpoint:
            return
        repository = ModelRepository(cfg.repository.root, cfg.agent.model_name, cfg.repository.keep_last)
        service = ModelFetchService(
            repository, cfg.repository.fetch_endpoint, curve=cfg.ingest.curve, wire=cfg.ingest.wire,
            # told to followers as configured ("": not announcing); a free port picked at bind is not known here
            announce_endpoint=None if cfg.repository.announce_endpoint.endswith((":0", ":*")) else cfg.repository.announce_endpoint,
        )
        try:
            self.fetch_service = service.start()
        except CLAgentError as e:  # servers on this machine read the folder; only remote followers lose out
            log.error("model fetch endpoint not started, remote servers cannot follow: %s", e)

    def run(self) -> int:
        from cl_agent.ingest import IngestService
        from cl_agent.metrics import AgentMetrics, serve_from_config
        from cl_agent.status import initial_state, records_backwards, write_state

        cfg = self.cfg
        # First: a stop asked for during the start-up (which takes seconds) is a clean stop, not exit 143.
        install_stop_handlers(self.stop_requested, again=self._still_stopping)
        self._lock()
        try:  # before any socket is bound: a sample acked now must not wait for a trainer that cannot start
            check_trainer_start(cfg)
        except CLAgentError as error:
            return self._refuse_start(error)
        save_resolved(cfg, self.workdir / RESOLVED_CONFIG)
        # Without a hosted server the agent does not know the served version: it exports none (see AgentMetrics).
        metrics = self.metrics = AgentMetrics(served_version=cfg.agent.host_server)
        metrics_server = serve_from_config(metrics, cfg.metrics)
        state = initial_state(metrics_port=metrics_server.port if metrics_server else None, metrics_host=cfg.metrics.host)
        state["heartbeat_s"] = cfg.metrics.state_interval_s
        state["host_server"] = cfg.agent.host_server  # false: served_version stays null, status says it is not tracked
        state["update"] = None
        # where `cl-agent status` reads the hold on publishing (the file, not this copy, when it can reach it)
        state["model_repository"] = {"root": str(Path(cfg.repository.root).resolve()), "model": cfg.agent.model_name}
        self._refresh_published(state, metrics, None)  # published before this start: not "none published yet"
        last = next(records_backwards(self.workdir), None)
        state["last_experience"] = last.get("experience") if last else None
        state["last_trained_version"] = next(
            (r["version"] for r in records_backwards(self.workdir) if isinstance(r.get("version"), int)), None
        )
        ingest = IngestService(
            cfg.ingest, cfg.spool, cfg.reservoir, cfg.experience, self.workdir, seed=cfg.agent.seed
        ).start()
        log.info("working directory %s, model repository %s (model %r)", self.workdir.resolve(),
                 Path(cfg.repository.root).resolve(), cfg.agent.model_name)
        log.info("ingest listening: %s", ", ".join(f"{k}={v}" for k, v in ingest.endpoints.items()))
        starting = not self.stop_requested.is_set()  # else stopped during the start-up: start no children
        if starting:
            self._start_fetch_service()
            self._start_trainer()
        if cfg.agent.host_server:
            state.update(server_restarts=0, server_failure=None)
        if starting and cfg.agent.host_server:
            self._start_server()
        view = self.view
        if view is not None and state["published_version"] is not None:
            view.update({"published_version": state["published_version"]})
        if starting and cfg.agent.host_server:
            self.served_watch = threading.Thread(
                target=self._watch_served_version, args=(state, metrics, view), name="served-version", daemon=True
            )
            self.served_watch.start()

        last_state = last_published = 0.0
        code = 0
        try:
            while not self.stop_requested.is_set():
                if ingest.failure is not None:
                    # No socket is served any more: stop (exit 1) rather than run deaf; a restart resumes.
                    state["stop_error"] = f"ingestion failed: {type(ingest.failure).__name__}: {ingest.failure}"
                    log.error("%s; stopping", state["stop_error"])
                    code = 1
                    break
                self._drain_results(state, metrics, view)
                self._supervise(state, metrics, view)
                counters = ingest.counters()
                pending = len(ingest.store.pending())
                metrics.sync_ingest(counters)
                metrics.set_counts(
                    spool_samples=counters.get("open_experience_samples"),
                    spool_bytes=counters.get("spool_bytes"),
                    trained_data_bytes=counters.get("trained_data_bytes"),
                    reservoir_size=counters["reservoir_frames"],
                    backlog=pending,
                )
                update = self.progress.snapshot()
                state.update(counters=counters, pending_experiences=pending, update=update)
                now = time.monotonic()
                if now - last_published >= PUBLISHED_POLL_S:
                    self._refresh_published(state, metrics, view)
                    last_published = now
                if view is not None:
                    view.update({"ingest": _rate_counters(counters), "backlog": pending, **(update or {})})
                if now - last_state >= cfg.metrics.state_interval_s:
                    write_state(self.workdir, state)
                    last_state = now
                self.stop_requested.wait(0.25)
        finally:
            self._shutdown(ingest, state, view, metrics, metrics_server)
        return code or self.exit_code

    def _drain_results(self, state: dict, metrics, view) -> None:
        while self.results is not None:
            try:
                item = self.results.get_nowait()
            except queue.Empty:
                return
            except Exception as e:  # noqa: BLE001 - a trainer killed mid-put can leave a truncated message
                log.warning("cannot read the trainer's last results (%s: %s); its records on disk stay", type(e).__name__, e)
                return
            if "progress" in item:  # a training step, or the start of a later phase
                info = item["progress"]
                self.progress.report(info)
                if not self._long_update_warned:
                    warning = long_update_warning(self.progress.snapshot(), self.cfg.train)
                    if warning is not None:  # once: every update of this schedule is as long
                        self._long_update_warned = True
                        log.warning("%s", warning)
                if view is not None:
                    fields = dict(self.progress.snapshot() or {})
                    if "losses" in info:  # a phase message has none: the last step's stay shown
                        fields["losses"] = info["losses"] or {}
                    view.update(fields)
                continue
            if "warning" in item:
                if item["warning"] not in self._warned:
                    self._warned.add(item["warning"])
                    log.warning("%s", item["warning"])
                continue
            if "error" in item and item.get("fatal"):
                state["stop_error"] = f"trainer cannot start: {item['error']}"
                log.error("%s; stopping (restarting it would fail the same way)", state["stop_error"])
                self.exit_code = 2
                self.stop_requested.set()
                continue
            if "error" in item:  # the trainer raised and exits: _supervise counts it when it schedules the restart
                log.error("trainer reported: %s", item["error"])
                continue
            state["last_experience"] = item["experience"]
            if item.get("republished"):  # a checkpoint trained earlier (held, or its export failed), published now
                state["last_trained_version"] = item["version"]
                self._refresh_published(state, metrics, view)
                log.info("experience %d (trained earlier) published as version %d (%s)",
                         item["experience"], item["version"], item["republished"])
                continue
            self.progress.finish()
            if item.get("skipped"):  # nothing trained or published: the served model and the metrics stay
                log.warning("experience %d not trained (%s); published version stays %s",
                            item["experience"], item["skipped"], state.get("published_version"))
                if view is not None:
                    view.update({"phase": "idle"})
                continue
            if item.get("publish_error"):  # trained, but not published (export refused, or a write failed): the served version stays
                metrics.inc_publish_failures()
            elif item["version"] is not None:  # None: publishing held (``cl-agent models hold``)
                state["last_trained_version"] = item["version"]
                self._refresh_published(state, metrics, view)  # now, not at the next poll
            metrics.inc_experiences_trained(len(item.get("merged", [item["experience"]])))
            if not item.get("recovered"):  # a recovered update's times were lost with the crash
                metrics.observe_update(item["update_seconds"], item["losses"])
                metrics.observe_export(item["export_seconds"])
            if item["online_accuracy"] is not None:
                metrics.set_online_accuracy(item["online_accuracy"])
            export_seconds = item.get("export_seconds") or 0.0
            published = (item["version"] if item["version"] is not None and not item.get("publish_error")
                         else f"none (not published; {state.get('published_version')} stays)")
            if item.get("recovered"):  # recorded from its checkpoint after a crash: nothing was trained or timed now
                log.info("experience %d recovered from its checkpoint (trained before the restart; its timings, losses "
                         "and online accuracy were not recorded), published version %s", item["experience"], published)
            else:
                log.info(
                    "experience %d trained (%d labeled, %d unlabeled) in %.1f s (training %.1f s, export and publish %.1f s), "
                    "online accuracy %s, published version %s",
                    item["experience"], item["labeled"], item["unlabeled"], item["update_seconds"] + export_seconds,
                    item["update_seconds"], export_seconds,
                    "n/a" if item["online_accuracy"] is None else f"{item['online_accuracy']:.3f}", published,
                )
            if view is not None:  # after the published version was read: "idle (version N)" names the new one
                view.update({"phase": "idle", "online_accuracy": item["online_accuracy"]})

    def _supervise(self, state: dict, metrics, view) -> None:
        """Restart a crashed trainer or server, each after a growing pause (its work is durable, so it
        resumes). The pause is scheduled, not slept: ingestion and the heartbeat go on meanwhile, and a
        server that cannot start (its port taken) is retried slowly instead of in a tight loop."""
        if self.stop_requested.is_set():
            return
        now = time.monotonic()
        if self.trainer is not None and not self.trainer.is_alive() and "trainer" not in self._restart_at:
            self._drain_results(state, metrics, view)  # what it reported before it died
            if self.stop_requested.is_set():  # it could not start at all: no restart
                return
            self.trainer_restarts += 1
            self.progress.finish()  # its update is abandoned; the restarted trainer begins it again
            if view is not None:
                view.update({"phase": "idle"})
            metrics.inc_trainer_failures()
            pause = min(30.0, 2.0**self.trainer_restarts)
            log.error("trainer exited with code %s; restarting in %.0f s", self.trainer.exitcode, pause)
            self._restart_at["trainer"] = now + pause
        if self.server is not None and not self.server.is_alive() and "server" not in self._restart_at:
            reason = self._server_exit_reason()
            if self.server.exitcode == 2:  # its configuration: a restart would fail the same way
                state["stop_error"] = f"hosted server cannot run: {reason}"
                log.error("%s; stopping (restarting it would fail the same way)", state["stop_error"])
                self.exit_code = 2
                self.stop_requested.set()
                return
            self.server_restarts += 1
            state["server_restarts"] = self.server_restarts
            state["server_failure"] = reason
            pause = min(30.0, 2.0 ** (self.server_restarts - 1))
            log.error("server exited with code %s (%s); restarting in %.0f s", self.server.exitcode, reason, pause)
            self._restart_at["server"] = now + pause
        elif state.get("server_failure") is not None and self.server is not None and self.server.is_alive():
            unwatched = self.served_watch is None or not self.served_watch.is_alive()  # a random serve.endpoint port
            if self._server_answered > self._server_started or (unwatched and now - self._server_started >= SERVER_UP_S):
                state["server_failure"] = None  # it runs again (or, unwatched, has been up a while)
                log.info("hosted server running again (after %d restarts)", self.server_restarts)
        for name, start in (("trainer", self._start_trainer), ("server", self._start_server)):
            if name in self._restart_at and now >= self._restart_at[name]:
                del self._restart_at[name]
                start()

    def _server_exit_reason(self) -> str:
        """What the dead server process sent before it exited, else its exit code."""
        try:
            if self.server_report is not None and self.server_report.poll():
                return str(self.server_report.recv())
        except (EOFError, OSError):  # it exited without sending (killed, or a crash in the interpreter)
            pass
        code = self.server.exitcode
        if code is not None and code < 0:
            return f"killed by signal {signal.Signals(-code).name} (see server.log)"
        return f"exited with code {code} (see server.log)"

    def _shutdown(self, ingest, state: dict, view, metrics, metrics_server) -> None:
        """Stop taking work, let the trainer abandon its update at the next step, close everything."""
        deadline = self._stop_deadline = time.monotonic() + self.cfg.agent.grace_period_s
        log.info("stopping: closing ingestion, then the trainer (grace %.0f s)", self.cfg.agent.grace_period_s)
        ingest.stop()
        if self.fetch_service is not None:
            self.fetch_service.stop()
        if self.trainer_stop is not None:
            try:
                self.trainer_stop.send("stop")
            except OSError:  # the trainer is gone already
                pass
        if self.served_watch is not None:  # its last question to the server, before the server stops
            self.served_watch.join(2.0)
        for child in (self.trainer, self.server):
            if child is None:
                continue
            if child is self.server and child.is_alive():
                child.terminate()  # SIGTERM: the server finishes in-flight requests and exits
            child.join(max(0.1, deadline - time.monotonic()))
            if child.is_alive():
                log.warning("%s did not stop within the grace period; killing it", child.name)
                child.kill()
                child.join(5)
        self._drain_results(state, metrics, view)  # an update that finished within the grace period
        try:  # the trainer marks an experience trained before it sends the result: count again after it
            from cl_agent.experience import ExperienceStore

            state["pending_experiences"] = len(ExperienceStore(self.workdir).pending())
        except (OSError, CLAgentError) as e:
            log.warning("cannot count the experiences waiting to be trained: %s", e)
        state["status"] = "stopped"
        state["update"] = None  # an update still under way was abandoned: the next start trains it again
        from cl_agent.status import write_state

        write_state(self.workdir, state)
        if view is not None:
            view.close()
        if metrics_server is not None:
            metrics_server.stop()
        if self.results is not None:
            self.results.cancel_join_thread()
        log.info("stopped")


def _rate_counters(counters: dict) -> dict:
    """The ingest totals the live view shows as rates."""
    return {
        "labeled images": counters["labeled_images_acked"],
        "frames": counters["frames_accepted"],
        "dropped": counters["frames_dropped"],
        "rejected": sum(counters["rejected"].values()),
    }


def live_view(cfg: AgentConfig, stream):
    """The progress view on ``stream`` the config asks for (metrics.console), or None. Not with
    agent.log_json on a stream that is not a terminal: JSON log lines on a pipe are for a collector, and
    plain progress lines between them would break its parsing."""
    from cl_agent.console import LiveView

    if cfg.agent.log_json and not stream.isatty():
        return None
    return LiveView.from_section(cfg.metrics, stream)


def run_agent(cfg: AgentConfig, stop_requested: threading.Event | None = None) -> int:
    """``stop_requested``: the event the caller's signal handlers set since before this call (``cl-agent
    run`` installs them before its own imports): a stop asked for then is carried out, not lost."""
    stop_requested = stop_requested if stop_requested is not None else threading.Event()
    install_stop_handlers(stop_requested)  # before the slow imports and start-up: SIGTERM then stops cleanly (exit 0)
    from cl_agent.distributed import check_agent_nproc
    from cl_agent.logs import setup_logging

    from cl_agent.ingest import make_workdir

    check_agent_nproc(cfg.train.nproc)  # before anything starts: a clear refusal, not a restart loop
    make_workdir(cfg.agent.workdir)
    make_workdir(cfg.repository.root, "repository.root")  # else the first publish fails, and every retry
    view = live_view(cfg, sys.stderr)
    stream = view.log_stream() if view is not None else None
    setup_logging(cfg.agent.log_level, cfg.agent.log_json, file=Path(cfg.agent.workdir) / "agent.log", stream=stream,
                  max_bytes=cfg.agent.log_max_bytes, backups=cfg.agent.log_backups)
    quiet_libraries()
    return Agent(cfg, view, stop_requested).run()
