"""Crash test: `kill -9` a real `cl-agent run` at random moments while clients stream, then check nothing was lost.

    python tools/chaos.py --json                 # 20 trials
    python tools/chaos.py --trials 2 --seed 1    # a quick one

One agent (tiny model, hosted server) runs on free loopback ports in a scratch
working directory. While it runs:

- a labeled sender (``LabeledClient``, Lazy Pirate retries) streams small JPEG
  batches and records every (sender, seq) that was acked and with how many images;
  it cuts experiences with ``end_experience`` every few batches (and the agent
  also cuts by count);
- a frame sender streams camera frames (lossy by design);
- a watcher lists the repository's numbered version folders and verifies each one
  it sees (manifest readable, sha256 matches); a folder that vanishes through
  retention between listing and reading is fine, a visible folder that is partial
  or unreadable is an inconsistency; it also remembers each version's content, so
  a number published twice is caught;
- a probe asks the server which version it serves (it must never go back).

Each trial waits a uniform random delay after the agent started (so kills land
during start-up, ingestion, training, export and publishing), sends SIGKILL to the
agent process (its trainer and server die with it) and starts it again. At the
end the senders stop, the last experience is cut, the agent trains everything
pending and gets SIGTERM (it must exit 0). Then, from the files:

- every acked (sender, seq) is in exactly one experience, with the image count
  that was sent (``lost_samples``, ``duplicate_samples``; an experience trained
  twice per ``experiences.jsonl`` counts its samples as duplicates too);
- versions only increase and no number names two different models.

Prints one JSON object (``--json``) or a summary; exit code 1 if any
must-be-zero count is not zero. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from cl_agent.client import AgentUnavailable, FrameClient, LabeledClient
from cl_agent.config import save_resolved
from cl_agent.demo import TINY, local_config
from cl_agent.errors import CLAgentError
from cl_agent.experience import ExperienceStore
from cl_agent.inference import InferenceClient
from cl_agent.repository import ModelRepository
from cl_agent.launcher import AgentProcess
from cl_agent.spool import read_records
from cl_agent.status import read_experience_records
from cl_agent.synthetic import CLASS_NAMES, make_batch

IMAGE_SIZE = 16
SENDER = "chaos-labeler"
EXPORT_TEMP_PREFIX = "export-"  # cl_agent.updater.EXPORT_TEMP_PREFIX (not imported: it would load torch here)
MUST_BE_ZERO = (
    "lost_samples",
    "duplicate_samples",
    "inconsistent_versions",
    "repeated_versions",
    "version_regressions",
    "served_regressions",
    "nacked_messages",
    "pending_at_end",
)


def say(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def agent_config(workdir: Path, **extra):
    """A tiny-model agent with a hosted server on free loopback ports; returns (config, its YAML path)."""
    overrides = {
        **TINY,
        "agent.host_server": True,
        "agent.grace_period_s": 20.0,
        "repository.keep_last": 3,  # retention runs during the test, so readers race deletions too
        "spool.keep_trained_bytes": -1,  # every acked message is checked against the spool at the end
        **extra,
    }
    cfg = local_config(workdir, "cpu", **overrides)
    return cfg, save_resolved(cfg, workdir / "agent.yaml")


# --------------------------------------------------------------------------- clients


class LabeledStream(threading.Thread):
    """Streams small labeled batches and cuts experiences; remembers what was acked."""

    def __init__(self, endpoint: str, seed: int, end_every: tuple[int, int] = (5, 25), pause_s: float = 0.15):
        super().__init__(name="labeled-sender", daemon=True)
        self.endpoint = endpoint
        self.rng = np.random.default_rng(seed)
        self.end_every = end_every
        self.pause_s = pause_s
        self.stop = threading.Event()
        self.sent: dict[int, int] = {}  # seq -> images
        self.acked: dict[int, int] = {}  # seq -> images, for acked labeled messages
        self.nacked: dict[int, str] = {}  # seq -> reason (none expected)
        self.end_seqs: set[int] = set()
        self.ends_acked = 0
        self.unavailable = 0
        self.reconnects = 0
        self.error: BaseException | None = None
        self.finished = threading.Event()

    def _take(self, acks) -> None:
        for ack in acks:
            if ack.seq in self.end_seqs:
                self.ends_acked += ack.ok
            elif ack.ok:
                self.acked[ack.seq] = self.sent[ack.seq]
            else:
                self.nacked[ack.seq] = f"{ack.reason}: {ack.detail}"

    def _submit(self, client: LabeledClient, fn) -> bool:
        try:
            fn()
            return True
        except AgentUnavailable:
            self.unavailable += 1  # the agent is restarting: pending messages are resent by the next call
            return False

    def run(self) -> None:
        client = LabeledClient(self.endpoint, SENDER, timeout_s=1.0, retries=2, window=4)
        try:
            batches, next_end = 0, int(self.rng.integers(*self.end_every))
            while not self.stop.is_set():
                count = int(self.rng.integers(1, 6))
                ids = self.rng.integers(0, len(CLASS_NAMES), count)
                images = make_batch(ids, self.rng, IMAGE_SIZE)
                labels = [CLASS_NAMES[c] for c in ids]

                def submit() -> None:
                    seq = client.submit(list(images), labels)
                    self.sent[seq] = count

                if self._submit(client, submit):
                    batches += 1
                self._take(client.poll_acks())
                if batches >= next_end:
                    batches, next_end = 0, int(self.rng.integers(*self.end_every))
                    self._submit(client, lambda: self.end_seqs.add(client.submit_encoded([], [], [], kind="end_experience")))
                self.stop.wait(self.pause_s)
            self._drain(client)
            # the last experience: everything acked is cut (a nack 'nothing_to_cut' is fine)
            self._submit(client, lambda: self.end_seqs.add(client.submit_encoded([], [], [], kind="end_experience")))
            self._drain(client)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            self.error = error
        finally:
            self.reconnects = client.reconnects
            client.close()
            self.finished.set()

    def _drain(self, client: LabeledClient, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while client.in_flight:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{client.in_flight} labeled messages still unanswered after {timeout_s} s")
            try:
                self._take(client.flush())
            except AgentUnavailable:
                self.unavailable += 1
        self._take(client.poll_acks())


class FrameStream(threading.Thread):
    def __init__(self, endpoint: str, seed: int, rate_hz: float = 30.0):
        super().__init__(name="frame-sender", daemon=True)
        self.endpoint, self.seed, self.period = endpoint, seed, 1.0 / rate_hz
        self.stop = threading.Event()
        self.sent = self.dropped = 0

    def run(self) -> None:
        rng = np.random.default_rng(self.seed)
        frames = FrameClient(self.endpoint, "chaos-camera", hwm=64)
        try:
            while not self.stop.is_set():
                for image in make_batch(rng.integers(0, len(CLASS_NAMES), 8), rng, IMAGE_SIZE):
                    frames.send(image)
                    self.stop.wait(self.period)
        finally:
            self.sent, self.dropped = frames.sent, frames.dropped
            frames.close()


class RepositoryWatcher(threading.Thread):
    """Reads every numbered version folder as a server would; remembers what it saw."""

    def __init__(self, root: str, model: str, serve_endpoint: str):
        super().__init__(name="repository-watcher", daemon=True)
        self.repository = ModelRepository(root, model)
        self.serve_endpoint = serve_endpoint
        self.stop = threading.Event()
        self.seen: dict[int, tuple[str, str]] = {}  # version -> (sha256, created_at)
        self.inconsistent: list[str] = []
        self.repeated: list[str] = []
        self.regressions: list[str] = []
        self.vanished = 0  # versions removed by retention while being read (fine)
        self.checks = 0
        self.served: list[int] = []
        self.served_regressions: list[str] = []

    def _scan(self) -> None:
        folder = self.repository.model_dir
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        numbered = sorted(int(n) for n in names if n.isascii() and n.isdigit())
        if numbered and self.seen and numbered[-1] < max(self.seen):
            self.regressions.append(f"newest folder {numbered[-1]} after version {max(self.seen)} was seen")
        for version in numbered:
            path = self.repository.version_dir(version)
            if not path.is_dir():
                continue
            self.checks += 1
            try:
                manifest = self.repository.verify(version)
            except (CLAgentError, OSError) as error:
                if path.exists():
                    self.inconsistent.append(f"version {version}: {error}")
                else:
                    self.vanished += 1
                continue
            identity = (manifest["sha256"], manifest.get("created_at", ""))
            if self.seen.setdefault(version, identity) != identity:
                self.repeated.append(f"version {version} seen as {self.seen[version]} and {identity}")

    def _probe(self, client: InferenceClient) -> None:
        try:
            served = client.status()["model_version"]
        except CLAgentError:
            return  # no server right now (the agent is restarting)
        if served is None:
            return
        if self.served and served < self.served[-1]:
            self.served_regressions.append(f"served version {served} after {self.served[-1]}")
        if not self.served or served != self.served[-1]:
            self.served.append(served)

    def run(self) -> None:
        client = InferenceClient(self.serve_endpoint, timeout_s=0.5, retries=0)
        last_probe = 0.0
        try:
            while not self.stop.is_set():
                self._scan()
                if time.monotonic() - last_probe > 0.5:
                    self._probe(client)
                    last_probe = time.monotonic()
                self.stop.wait(0.02)
            self._scan()
        finally:
            client.close()


# --------------------------------------------------------------------------- checks


def kill_phase(agent: AgentProcess, cfg) -> str:
    """Roughly what the agent was doing when killed (for the report only): files that exist only during a phase."""
    workdir = Path(cfg.agent.workdir)

    def fresh(path: Path) -> bool:  # left by this run of the agent, not by an earlier killed one
        try:
            return path.stat().st_mtime >= agent.started_wall
        except FileNotFoundError:
            return False

    model_dir = Path(cfg.repository.root) / cfg.agent.model_name
    if model_dir.is_dir() and any(p.name.startswith(".tmp-") and fresh(p) for p in model_dir.iterdir()):
        return "publish"  # copying a version into the repository
    if not workdir.is_dir():
        return "start"  # killed before the agent made its working directory
    if any(p.is_dir() and p.name.startswith(EXPORT_TEMP_PREFIX) and fresh(p) for p in workdir.iterdir()):
        return "export"  # ONNX export + parity check
    if ExperienceStore(workdir).pending():
        return "backlog"  # experiences waiting: the trainer is starting, restoring or training
    return "ingest"  # nothing to train: only ingestion and serving


def check_samples(workdir: Path, acked: dict[int, int]) -> dict:
    """Acked messages against the experiences on disk: each acked key in exactly one experience, once trained."""
    store = ExperienceStore(workdir)
    indices = store.indices()
    stored: dict[tuple[str, int], list[tuple[int, int]]] = defaultdict(list)  # key -> [(experience, images)]
    listed = Counter()
    labeled_in_experiences = 0
    for index in indices:
        meta = store.meta(index)
        labeled_in_experiences += meta["labeled_samples"]
        listed.update((s, q) for s, q in meta["keys"])
        for _, record in read_records(store.spool_dir / meta["labeled_segment"]):
            stored[(record.sender, record.seq)].append((index, len(record.payloads)))
    lost = duplicate = size_mismatch = 0
    for seq, images in acked.items():
        key = (SENDER, seq)
        copies = stored.get(key, [])
        if not copies or listed[key] == 0:
            lost += images
            continue
        duplicate += images * (max(len(copies), listed[key]) - 1)
        size_mismatch += sum(n != images for _, n in copies)
    unacked_stored = sum(n for key, copies in stored.items() if key[0] == SENDER and key[1] not in acked for _, n in copies)
    # experiences trained twice (or never) according to experiences.jsonl
    trained = Counter(i for record in read_experience_records(workdir) for i in record.get("merged", []))
    for index, times in trained.items():
        if times > 1:
            duplicate += store.meta(index)["labeled_samples"] * (times - 1)
    return {
        "experiences": len(indices),
        "labeled_in_experiences": labeled_in_experiences,
        "lost_samples": lost,
        "duplicate_samples": duplicate,
        "image_count_mismatches": size_mismatch,
        "unacked_stored_samples": unacked_stored,
        "pending_at_end": len(store.pending()),
        "experiences_never_recorded": sum(1 for i in indices if trained[i] == 0),
        "experiences_skipped": sum(1 for r in read_experience_records(workdir) if r.get("skipped")),
    }


def check_versions(cfg, watcher: RepositoryWatcher) -> dict:
    repository = ModelRepository(cfg.repository.root, cfg.agent.model_name)
    records = read_experience_records(cfg.agent.workdir)
    recorded = [r["version"] for r in records if r.get("version") is not None]
    regressions = list(watcher.regressions)
    # each record's version is newer than the previous one (a recovered record may name the same version only
    # if the update before the crash published it and the record was lost; that version must then be new too)
    for before, after in zip(recorded, recorded[1:]):
        if after <= before:
            regressions.append(f"experiences.jsonl: version {after} after {before}")
    manifests = {}
    for version in repository.versions():
        manifest = repository.verify(version)
        manifests[version] = manifest
        identity = (manifest["sha256"], manifest.get("created_at", ""))
        if watcher.seen.setdefault(version, identity) != identity:
            watcher.repeated.append(f"version {version} changed content")
    published = sorted(watcher.seen)
    return {
        "versions_published": len(published),
        "last_version": published[-1] if published else None,
        "versions_checked": watcher.checks,
        "versions_vanished_by_retention": watcher.vanished,
        "inconsistent_versions": len(watcher.inconsistent),
        "repeated_versions": len(watcher.repeated),
        "version_regressions": len(regressions),
        "served_versions": watcher.served,
        "served_regressions": len(watcher.served_regressions),
        "problems": (watcher.inconsistent + watcher.repeated + regressions + watcher.served_regressions)[:20],
    }


def _count_lines(path: Path, text: str) -> int:
    try:
        return path.read_text(errors="replace").count(text)
    except FileNotFoundError:
        return 0


def wait_until_trained(cfg, agent: AgentProcess, timeout_s: float) -> bool:
    store = ExperienceStore(cfg.agent.workdir)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not store.pending():
            return True
        if not agent.alive():
            raise RuntimeError(f"the agent exited with code {agent.process.returncode} while training the backlog")
        time.sleep(0.25)
    return False


# --------------------------------------------------------------------------- a run's folder and result
# (shared with tools/fuzz_wire.py)


def run_folder(workdir: Path | None, prefix: str) -> tuple[Path, Path | None]:
    """The folder a run works in, and that folder again when it is a scratch folder made here (else None)."""
    if workdir is not None:
        return Path(workdir), None
    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    return scratch, scratch


def settle_scratch(result: dict, scratch: Path | None) -> dict:
    """Remove the scratch folder of a run whose ``result["ok"]``; otherwise keep it and name it in the result."""
    if scratch is not None and result["ok"]:
        shutil.rmtree(scratch, ignore_errors=True)
    elif scratch is not None:
        result["workdir"] = str(scratch)  # kept for a post-mortem
    return result


def add_run_options(parser: argparse.ArgumentParser, workdir_help: str) -> None:
    """--seed, --json and --workdir."""
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    parser.add_argument("--workdir", type=Path, default=None, help=f"{workdir_help} (default: a temp folder, removed if all is well)")


def print_result(result: dict, as_json: bool, keys, width: int) -> int:
    """Print the whole result as JSON, or ``keys`` one a line; the exit code: 0 if the result is ok, else 1."""
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        for key in keys:
            print(f"{key:>{width}}: {result[key]}")
    return 0 if result["ok"] else 1


# --------------------------------------------------------------------------- main


def run_chaos(trials: int = 20, seed: int = 0, workdir: Path | None = None, max_delay_s: float = 15.0,
              min_delay_s: float = 0.5, train_timeout_s: float = 600.0) -> dict:
    """Run the crash test; returns the result dict (see the module docstring)."""
    started = time.monotonic()
    workdir, scratch = run_folder(workdir, "cl-agent-chaos-")
    if workdir.exists() and any(workdir.iterdir()):
        raise CLAgentError(f"--workdir {workdir} is not empty; the crash test starts from nothing")
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    cfg, config_path = agent_config(workdir, **{"experience.labeled_samples": 60})
    log_path = workdir / "agent-process.log"
    say(f"workdir {workdir}; {trials} trials, kill delay uniform in [{min_delay_s}, {max_delay_s}] s")

    agent = AgentProcess(config_path, log_path)
    labeled = LabeledStream(cfg.ingest.labeled_endpoint, seed + 1)
    frames = FrameStream(cfg.ingest.frame_endpoint, seed + 2)
    watcher = RepositoryWatcher(cfg.repository.root, cfg.agent.model_name, cfg.serve.endpoint)
    for thread in (labeled, frames, watcher):
        thread.start()
    phases: Counter = Counter()
    exit_code = None
    try:
        for trial in range(trials):
            delay = float(rng.uniform(min_delay_s, max_delay_s))
            time.sleep(max(0.0, agent.started + delay - time.monotonic()))
            if not agent.alive():
                raise RuntimeError(f"the agent exited by itself with code {agent.process.returncode}; see {log_path}")
            phase = kill_phase(agent, cfg)
            phases[phase] += 1
            agent.kill9()
            say(f"trial {trial + 1}/{trials}: killed after {delay:.1f} s ({phase}); acked {len(labeled.acked)} "
                f"messages, versions seen {len(watcher.seen)}")
            agent = AgentProcess(config_path, log_path)
        say("stopping the senders, cutting the last experience")
        labeled.stop.set()
        frames.stop.set()
        labeled.finished.wait(240)
        if labeled.error is not None:
            raise RuntimeError(f"labeled sender failed: {labeled.error!r}")
        if not labeled.finished.is_set():
            raise RuntimeError("labeled sender did not finish")
        say("waiting until every experience is trained")
        trained_all = wait_until_trained(cfg, agent, train_timeout_s)
        time.sleep(1.0)  # the watcher sees the last version
        exit_code = agent.terminate(cfg.agent.grace_period_s + 20)
        say(f"agent stopped with exit code {exit_code}")
    finally:
        labeled.stop.set()
        frames.stop.set()
        watcher.stop.set()
        if agent.alive():
            agent.kill9()
        for thread in (labeled, frames, watcher):
            thread.join(10)

    result = {
        "trials": trials,
        "restarts": trials,
        "acked_samples": sum(labeled.acked.values()),
        "acked_messages": len(labeled.acked),
        "nacked_messages": len(labeled.nacked),
        **check_samples(Path(cfg.agent.workdir), labeled.acked),
        **check_versions(cfg, watcher),
        # versions the hosted server refused to load (informational: a load can race retention)
        "server_swap_failures": _count_lines(Path(cfg.agent.workdir) / "server.log", "not swapping to version"),
        "leftover_export_dirs": len(list(Path(cfg.agent.workdir).glob(f"{EXPORT_TEMP_PREFIX}*"))),
        "final_exit_code": exit_code,
        "all_trained": trained_all,
        "kill_phases": dict(phases),
        "explicit_ends_acked": labeled.ends_acked,
        "client_reconnects": labeled.reconnects,
        "frames_sent": frames.sent,
        "wall_seconds": round(time.monotonic() - started, 1),
        "workdir": None if scratch else str(workdir),
    }
    result["ok"] = all(result[k] == 0 for k in MUST_BE_ZERO) and exit_code == 0 and trained_all
    return settle_scratch(result, scratch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20, help="kill -9 + restart cycles (default 20)")
    add_run_options(parser, "empty folder to run in")
    parser.add_argument("--max-delay", type=float, default=15.0, help="longest wait after a start before the kill (s)")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials must be >= 1, got {args.trials}")
    result = run_chaos(args.trials, args.seed, args.workdir, max_delay_s=args.max_delay)
    keys = ("trials", "acked_samples", *MUST_BE_ZERO, "versions_published", "experiences", "wall_seconds")
    return print_result(result, args.json, keys, width=24)


if __name__ == "__main__":
    sys.exit(main())
