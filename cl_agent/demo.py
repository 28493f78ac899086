"""``cl-agent demo``: the whole product on one machine, with no external data.

It starts ``cl-agent run`` (agent + hosted server) as a child process on free
loopback ports, then plays a camera and a labeler: for each experience it
streams unlabeled frames and labeled batches of the built-in shape stream
(``cl_agent.synthetic``: classes arrive over time and come back), marks the
end of the experience, waits until the server answers with the new model
version, and measures that served model on held-out images of the classes
seen so far, as an inference client would.
"""

from __future__ import annotations

import re
import signal
import socket
import time
from pathlib import Path

import numpy as np

from cl_agent.config import load_config, save_resolved
from cl_agent.errors import CLAgentError
from cl_agent.launcher import AgentProcess
from cl_agent.synthetic import CLASS_NAMES, make_batch, schedule

LABELED_PER_CLASS = 60
FRAMES_PER_EXPERIENCE = 150
TEST_PER_CLASS = 25
IMAGE_SIZE = 32


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_config(workdir: Path, device: str = "auto", **overrides):
    """An agent config for one machine: every endpoint on a free loopback port, files under ``workdir``.

    ``overrides`` are dotted keys (``{"train.lr": 0.01}``) applied last.
    """
    port = {name: _free_port() for name in ("labeled", "frame", "control", "announce", "fetch", "serve")}
    values = {
        "agent.workdir": str(Path(workdir) / "agent"),
        "agent.device": device,
        "ingest.labeled_endpoint": f"tcp://127.0.0.1:{port['labeled']}",
        "ingest.frame_endpoint": f"tcp://127.0.0.1:{port['frame']}",
        "ingest.control_endpoint": f"tcp://127.0.0.1:{port['control']}",
        "repository.root": str(Path(workdir) / "models"),
        "repository.announce_endpoint": f"tcp://127.0.0.1:{port['announce']}",
        "repository.fetch_endpoint": f"tcp://127.0.0.1:{port['fetch']}",
        "serve.endpoint": f"tcp://127.0.0.1:{port['serve']}",
        "metrics.port": 0,
        "metrics.console": False,
    }
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config(None, values)


# A tiny model and schedule for tests and fault tools: an update takes seconds on one CPU thread.
TINY = {
    "model.backbone": "test_resnet",
    "model.num_classes": len(CLASS_NAMES),
    "model.image_size": 16,
    "train.labeled_batch": 16,
    "train.unlabeled_batch": 8,
    "train.rotation_images": 4,
    "train.memory_batch": 4,
    "train.epochs_base": 2,
    "train.epochs_min": 2,
    "train.augment": False,
    "export.parity_samples": 4,
    "serve.poll_s": 0.2,
    "serve.intra_op_threads": 1,
    "metrics.state_interval_s": 0.5,
    "experience.labeled_samples": 10_000,
    "experience.max_wait_s": 3600.0,
    "experience.unlabeled_samples": 16,
}


def demo_config(workdir: Path, device: str, overrides: dict | None = None):
    """The demo's configuration: a ResNet-18 at 32 px with a short schedule (``overrides`` last)."""
    return local_config(
        workdir,
        device,
        **{
            "agent.host_server": True,
            "serve.poll_s": 0.5,
            "experience.labeled_samples": 100_000,  # experiences end on the demo's explicit marker
            "experience.max_wait_s": 86_400.0,
            "experience.unlabeled_samples": FRAMES_PER_EXPERIENCE,
            "reservoir.capacity": 1000,
            "model.num_classes": len(CLASS_NAMES),
            "model.image_size": IMAGE_SIZE,
            "model.backbone": "resnet18",
            "train.labeled_batch": 32,
            "train.unlabeled_batch": 16,  # a light step: the demo should take minutes on a laptop CPU
            "train.rotation_images": 4,
            "train.epochs_base": 10,  # a short schedule: minutes on a laptop CPU
            "train.epochs_min": 10,
            "train.lr": 1e-3,
            **(overrides or {}),
        },
    )


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _say(text: str) -> None:
    print(text, flush=True)


def _wait_for_version(client, agent: AgentProcess, version: int, probe: np.ndarray, timeout_s: float) -> int:
    """Poll the server until it answers with ``version`` or newer; shows elapsed time."""
    started = time.monotonic()
    last_shown = 0.0
    while True:
        agent.check()
        try:
            served = client.predict(probe).model_version
        except CLAgentError:
            served = None
        if served is not None and served >= version:
            return served
        elapsed = time.monotonic() - started
        if elapsed > timeout_s:
            raise CLAgentError(f"no model version {version} served after {timeout_s:.0f} s (served: {served})")
        if elapsed - last_shown >= 10:
            _say(f"    ... updating the model ({elapsed:.0f} s; serving version {served})")
            last_shown = elapsed
        time.sleep(0.5)


def _control_socket(control_endpoint: str):
    """A REQ socket to the agent's control endpoint that may resend a status request left unanswered."""
    import zmq

    socket_ = zmq.Context.instance().socket(zmq.REQ)
    socket_.linger = 0
    socket_.setsockopt(zmq.REQ_RELAXED, 1)  # a status request that timed out may be sent again ...
    socket_.setsockopt(zmq.REQ_CORRELATE, 1)  # ... and a late answer to it is dropped
    socket_.connect(control_endpoint)
    return socket_


def _wait_for_agent(agent: AgentProcess, control_endpoint: str, timeout_s: float) -> None:
    """Wait until the agent answers on its control socket, so that an agent that cannot start
    is reported before anything is streamed to it (AgentProcess.check raises once it has exited)."""
    from cl_agent.wire import encode_message

    socket_ = _control_socket(control_endpoint)
    deadline, seq = time.monotonic() + timeout_s, 0
    try:
        while True:
            agent.check()
            seq += 1
            socket_.send_multipart(encode_message("status", "demo", seq))
            if socket_.poll(500):
                socket_.recv_multipart()
                return
            if time.monotonic() > deadline:
                raise CLAgentError(f"the agent has not answered on {control_endpoint} after {timeout_s:.0f} s; see {agent.log.name}")
    finally:
        socket_.close()


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def exit_reason(agent_workdir: Path, log_path: Path) -> str | None:
    """Why the agent stopped, in its own words: ``stop_error`` of its state.json, else the last
    ``error:`` line the command line printed to its log, else the last ERROR record or traceback line."""
    from cl_agent.status import read_state

    try:
        state = read_state(agent_workdir)
    except CLAgentError:
        state = None
    if state and state.get("stop_error"):
        return str(state["stop_error"])
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))
            lines = [_ANSI.sub("", line).rstrip() for line in f.read().decode("utf-8", "replace").splitlines()]
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    for index in range(len(lines) - 1, -1, -1):
        line = lines[index]
        if " ERROR " in line or " CRITICAL " in line:
            return line.split(": ", 1)[-1]
        if line.startswith("Traceback (most recent call last)"):
            last = [text for text in lines[index + 1 :] if text and not text.startswith(" ")]
            return last[-1] if last else None
    return None


def _agent_failure(agent: AgentProcess, agent_workdir: Path) -> CLAgentError:
    """The error for an agent that exited: its exit code and its reason, and where its log is."""
    reason = exit_reason(agent_workdir, Path(agent.log.name))
    said = f": {reason}" if reason else ""
    return CLAgentError(f"the agent exited with code {agent.process.returncode}{said} (log: {agent.log.name})")


def _wait_for_frames(agent: AgentProcess, control_endpoint: str, sent: int, timeout_s: float = 15.0) -> int:
    """Wait until the agent has received ``sent`` camera frames in all (its control socket's counters).

    Frames travel on their own connection, so the labeled batches and the end-of-experience marker
    can overtake them (at start, the camera's connection may come up after the labeler's): without
    this wait, an experience would hold whatever frames happened to be there when it was cut, and
    the demo's figures would change from run to run. Returns the count received (less on a timeout).
    """
    import json

    from cl_agent.wire import encode_message

    socket_ = _control_socket(control_endpoint)
    received, deadline, seq = 0, time.monotonic() + timeout_s, 0
    try:
        while received < sent and time.monotonic() < deadline:
            agent.check()
            seq += 1
            socket_.send_multipart(encode_message("status", "demo", seq))
            if socket_.poll(1000):
                received = json.loads(socket_.recv_multipart()[0])["counters"]["frames_received"]
            if received < sent:
                time.sleep(0.02)
    finally:
        socket_.close()
    return received


def run_demo(
    workdir: Path, experiences: int = 6, device: str = "auto", timeout_s: float = 900.0, overrides: dict | None = None
) -> int:
    from cl_agent.client import FrameClient, LabeledClient
    from cl_agent.device import resolve_device
    from cl_agent.inference import InferenceClient
    from cl_agent.status import read_experience_records

    resolve_device(device, "--device")  # before anything starts: the agent would refuse it only after its start-up
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise CLAgentError(f"--workdir {workdir} is not a folder")
    if workdir.exists() and any(workdir.iterdir()):
        # The demo starts from nothing each time, but only ever empties a folder an earlier demo made.
        if not (workdir / "demo.yaml").is_file():
            raise CLAgentError(
                f"--workdir {workdir} is not empty and holds no demo.yaml (not a folder an earlier demo made): "
                "the demo empties its folder first, so give it a new or empty one"
            )
        import shutil

        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = demo_config(workdir, device, overrides)
    config_path = save_resolved(cfg, workdir / "demo.yaml")
    plan = schedule(experiences, classes_per_experience=3, seed=0)
    rng = np.random.default_rng(0)
    test_rng = np.random.default_rng(12345)
    test_images = {c: make_batch([c] * TEST_PER_CLASS, test_rng, IMAGE_SIZE) for c in range(len(CLASS_NAMES))}

    _say(f"cl-agent demo: {experiences} experiences of a built-in shape stream ({len(CLASS_NAMES)} classes), workdir {workdir}")
    _say(f"  starting the agent + server (log: {workdir / 'agent.log'}) ...")
    # SIGTERM ends the demo like Ctrl-C does: through the finally below, which stops the agent
    signal.signal(signal.SIGTERM, _interrupt)
    agent = AgentProcess(config_path, workdir / "agent.log", threads=None)
    labeled = LabeledClient(cfg.ingest.labeled_endpoint, "demo-labeler", timeout_s=10.0, retries=6)
    frames = FrameClient(cfg.ingest.frame_endpoint, "demo-camera", hwm=1000)
    inference = InferenceClient(cfg.serve.endpoint, timeout_s=2.0, retries=1)
    seen: set[int] = set()
    rows = []
    try:
        _wait_for_agent(agent, cfg.ingest.control_endpoint, timeout_s)
        for t, classes in enumerate(plan):
            agent.check()
            seen |= set(classes)
            names = ", ".join(CLASS_NAMES[c] for c in classes)
            _say(f"experience {t + 1}/{experiences}: classes [{names}]")
            # the camera: unlabeled frames of what is in view now, plus some of everything else
            in_view = rng.choice(classes + list(range(len(CLASS_NAMES))), size=FRAMES_PER_EXPERIENCE)
            for image in make_batch(in_view, rng, IMAGE_SIZE):
                frames.send(image)
            if _wait_for_frames(agent, cfg.ingest.control_endpoint, frames.sent) < frames.sent:
                _say("    (not every camera frame reached the agent in time; this experience holds fewer)")
            # the labeler: labeled batches, acked only once durable
            ids = np.repeat(classes, LABELED_PER_CLASS)
            rng.shuffle(ids)
            images = make_batch(ids, rng, IMAGE_SIZE)
            for start in range(0, len(ids), 30):
                labels = [CLASS_NAMES[c] for c in ids[start : start + 30]]
                ack = labeled.send(images[start : start + 30], labels)
                if not ack.ok:
                    raise CLAgentError(f"labeled batch refused: {ack.reason} {ack.detail}")
            end = labeled.end_experience()
            if not end.ok:
                raise CLAgentError(f"end of experience refused: {end.reason} {end.detail}")
            _say(f"    sent {len(ids)} labeled images (all acked) and {FRAMES_PER_EXPERIENCE} camera frames")
            served = _wait_for_version(inference, agent, t + 1, test_images[classes[0]][:1], timeout_s)
            # the served model on held-out images of every class seen so far
            correct = total = 0
            for c in sorted(seen):
                result = inference.predict(test_images[c])
                correct += sum(label == CLASS_NAMES[c] for label in result.labels)
                total += len(test_images[c])
            records = read_experience_records(cfg.agent.workdir)
            online = records[-1]["online_accuracy"] if records else None
            row = (t + 1, served, online, correct / total)
            rows.append(row)
            online_text = "n/a" if online is None else f"{online:.0%}"
            _say(
                f"    served version {served}: accuracy on held-out images of the {len(seen)} classes seen so far "
                f"{correct / total:.0%}; online accuracy on this experience before learning it {online_text}"
            )
    except CLAgentError:
        if not agent.alive():  # whatever failed here, the agent's own reason is the one to show
            raise _agent_failure(agent, Path(cfg.agent.workdir)) from None
        raise
    finally:
        labeled.close()
        frames.close()
        inference.close()
        code = agent.terminate(cfg.agent.grace_period_s + 30)
    _say("\nexperience  version  online accuracy (before learning)  served accuracy (seen classes)")
    for t, version, online, served_acc in rows:
        online_text = "n/a" if online is None else f"{online:.0%}"
        _say(f"{t:>10}  {version:>7}  {online_text:>33}  {served_acc:>30.0%}")
    _say(f"agent stopped (exit code {code}); `cl-agent status --workdir {cfg.agent.workdir}` and "
         f"`cl-agent report --workdir {cfg.agent.workdir}` show more")
    return 0 if code == 0 else 1
