"""Wire fuzzing: random and malformed messages to every endpoint of a running agent while valid traffic goes on.

    python tools/fuzz_wire.py --json                   # 10,000 messages
    python tools/fuzz_wire.py --messages 300 --seed 1  # a quick one

One agent (tiny model, hosted server) runs on free loopback ports. The fuzzer
sends ``--messages`` messages spread over the labeled ROUTER, the frame PULL
socket, the control REP socket and the serving ROUTER: random bytes, wrong part
counts, broken / non-object / deeply nested / huge JSON headers, wrong protocol
versions and kinds, bad senders and seqs, lying sizes and shapes, truncated
JPEG/PNG, decompression bombs (a small PNG or JPEG whose header declares a huge
image, and a real 16-megapixel PNG of ~50 KB), raw payloads of the wrong length,
wrong label counts and bad labels, oversized parts and too many parts.
ROUTER and REP endpoints are fed through DEALER sockets (a lost reply never
blocks the next message); every send has a timeout; loopback only.

Meanwhile a ``LabeledClient`` sends valid labeled batches (each must be acked)
and an ``InferenceClient`` asks for predictions (each must be answered).

Afterwards it reads the agent's counters (``state.json``: refusals by reason),
the server's counters, the peak RSS (VmHWM) of the agent and of its trainer and
server processes, and stops the agent with SIGTERM. Exit code 1 if the agent
died, a valid message was not acked, a prediction went unanswered, the trainer
crashed, the agent did not exit 0, or a peak RSS passed ``--rss-limit-mb``
(default 2048 MiB per process).
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chaos import add_run_options, agent_config, print_result, run_folder, settle_scratch  # noqa: E402  (a sibling tool)
from cl_agent.launcher import AgentProcess, child_pids, peak_rss_mb  # noqa: E402

from cl_agent.client import LabeledClient  # noqa: E402
from cl_agent.errors import CLAgentError  # noqa: E402
from cl_agent.inference import InferenceClient, InferenceError  # noqa: E402
from cl_agent.status import read_state  # noqa: E402
from cl_agent.synthetic import CLASS_NAMES, make_batch  # noqa: E402

ENDPOINTS = ("labeled", "frames", "control", "serve")
RSS_LIMIT_MB = 2048.0


def say(text: str) -> None:
    print(f"[fuzz {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- payloads


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(height: int, width: int, idat: bytes) -> bytes:
    """A PNG whose IHDR declares (height, width) RGB, with the given compressed pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def jpeg_declaring(jpeg: bytes, height: int, width: int) -> bytes:
    """``jpeg`` with the size in its start-of-frame segment replaced (a lying header)."""
    data = bytearray(jpeg)
    i = 2
    while i + 4 <= len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", data, i + 5, height, width)
            return bytes(data)
        i += 2 + length
    raise ValueError("no start-of-frame segment")


class Payloads:
    """Images made once: valid, truncated, lying and bombs."""

    def __init__(self, rng: np.random.Generator):
        image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        self.jpeg = cv2.imencode(".jpg", image)[1].tobytes()
        self.png = cv2.imencode(".png", image)[1].tobytes()
        self.raw = image.tobytes()
        # a real decompression bomb inside the limits: 4096 x 4096 RGB (48 MiB decoded) in ~50 KB
        row = b"\x00" + bytes(4096 * 3)
        self.bomb_16mp = png_declaring(4096, 4096, zlib.compress(row * 4096, 9))
        # headers that declare far more than the limits, with almost no data
        self.bomb_declared = png_declaring(100_000, 100_000, zlib.compress(row[:64], 9))
        self.bomb_jpeg = jpeg_declaring(self.jpeg, 60_000, 60_000)
        self.short_idat = png_declaring(4096, 4096, zlib.compress(row[:100]))  # header fine, data missing


# --------------------------------------------------------------------------- malformed messages


def _header(kind="labeled", sender="fuzz", seq=1, **fields) -> dict:
    return {"v": 1, "kind": kind, "sender": sender, "seq": seq, **fields}


def _js(value) -> bytes:
    return json.dumps(value).encode()


def make_case(rng: np.random.Generator, payloads: Payloads, endpoint: str, seq: int) -> tuple[str, list[bytes]]:
    """One malformed (or odd but valid) message for ``endpoint``: (case name, parts)."""
    kind = {"labeled": "labeled", "frames": "frame", "control": "end_experience", "serve": "infer"}[endpoint]
    labels = ["circle"] if kind == "labeled" else None
    j, p = payloads.jpeg, payloads.png

    def image_message(parts, shapes, encoding="jpeg", labels=labels, **fields) -> list[bytes]:
        header = _header(kind, seq=seq, encoding=encoding, shapes=shapes, **fields)
        if labels is not None:
            header["labels"] = labels
        return [_js(header), *parts]

    cases = {
        "random_bytes": lambda: [rng.bytes(int(rng.integers(0, 2000))) for _ in range(int(rng.integers(1, 5)))],
        "empty_header": lambda: [b""],
        "broken_json": lambda: [_js(_header(kind, seq=seq))[: int(rng.integers(1, 30))], j],
        "non_object_json": lambda: [[b"[1, 2]", b"42", b"null", b'"labeled"', b"true", b"{}"][int(rng.integers(0, 6))], j],
        "deep_json": lambda: [b"[" * int(rng.integers(1000, 60000))],
        "not_utf8": lambda: [b"\xff\xfe{" + rng.bytes(20), j],
        "huge_header": lambda: [_js(_header(kind, seq=seq, pad="x" * int(rng.integers(66_000, 200_000)))), j],
        "bad_version": lambda: [_js({**_header(kind, seq=seq), "v": [0, 2, "1", None, -1, 10**30][int(rng.integers(0, 6))]}), j],
        "bad_kind": lambda: [_js(_header(["", "Labeled", 7, None, "x" * 100, "frame", "labeled", "infer", "ack", "status"][int(rng.integers(0, 10))], seq=seq)), j],
        "bad_sender": lambda: [_js(_header(kind, sender=["", "s" * 300, 5, None, ["a"]][int(rng.integers(0, 5))], seq=seq)), j],
        "bad_seq": lambda: [_js(_header(kind, seq=[-1, "5", 1.5, True, None, 2**80][int(rng.integers(0, 6))])), j],
        "missing_fields": lambda: [_js({"v": 1}), j],
        "too_many_parts": lambda: image_message([j] * 300, [[16, 16, 3]] * 300, labels=["circle"] * 300 if labels else None),
        "fewer_parts_than_shapes": lambda: image_message([j], [[16, 16, 3]] * 3, labels=["circle"] * 3 if labels else None),
        "header_only": lambda: [_js(_header(kind, seq=seq, encoding="jpeg", shapes=[[16, 16, 3]], labels=labels))],
        "lying_shape": lambda: image_message([j], [[int(rng.integers(1, 64)), int(rng.integers(17, 64)), 3]]),
        "bad_shape_values": lambda: image_message([j], [[[0, 16, 3], [-16, 16], ["16", 16], [True, 16], [16.0, 16], [16], [16, 16, 3, 1], None][int(rng.integers(0, 8))]]),
        "truncated_jpeg": lambda: image_message([j[: int(rng.integers(2, len(j) - 1))]], [[16, 16, 3]]),
        "truncated_png": lambda: image_message([p[: int(rng.integers(8, len(p) - 1))]], [[16, 16, 3]], encoding="png"),
        "png_declared_as_jpeg": lambda: image_message([p], [[16, 16, 3]], encoding="jpeg"),
        "bomb_declared": lambda: image_message([payloads.bomb_declared], [[100_000, 100_000, 3]], encoding="png"),
        "bomb_lying_shape": lambda: image_message([payloads.bomb_declared], [[16, 16, 3]], encoding="png"),
        "bomb_jpeg": lambda: image_message([payloads.bomb_jpeg], [[60_000, 60_000, 3]]),
        "bomb_16mp_png": lambda: image_message([payloads.bomb_16mp], [[4096, 4096, 3]], encoding="png"),
        "png_short_data": lambda: image_message([payloads.short_idat], [[4096, 4096, 3]], encoding="png"),
        "raw_wrong_length": lambda: image_message([payloads.raw[: int(rng.integers(0, len(payloads.raw)))]], [[16, 16, 3]], encoding="raw"),
        "raw_huge_shape": lambda: image_message([payloads.raw], [[50_000, 50_000, 3]], encoding="raw"),
        "bad_encoding": lambda: image_message([j], [[16, 16, 3]], encoding=["gif", "", 5, None, "RAW"][int(rng.integers(0, 5))]),
        "bad_color": lambda: image_message([payloads.raw], [[16, 16, 3]], encoding="raw", color="cmyk"),
        "wrong_label_count": lambda: image_message([j, j], [[16, 16, 3]] * 2, labels=["circle"] * [0, 1, 3, 9][int(rng.integers(0, 4))]),
        "bad_labels": lambda: image_message([j], [[16, 16, 3]], labels=[[-1], [""], [1.5], [None], ["x" * 300], [{}], "circle", 3][int(rng.integers(0, 8))]),
        "class_id_out_of_range": lambda: image_message([j], [[16, 16, 3]], labels=[int(rng.integers(1000, 10**9))]),
        "class_id_past_model": lambda: image_message([j, j], [[16, 16, 3]] * 2, labels=[len(CLASS_NAMES) + 5] * 2),
        "new_class_names": lambda: image_message([j], [[16, 16, 3]], labels=[f"fuzz-{int(rng.integers(0, 10**6))}"]),
        "labels_on_frame": lambda: image_message([j], [[16, 16, 3]], labels=["circle"]),
        "huge_part": lambda: image_message([rng.bytes(int(rng.integers(4_000_001, 6_000_000)))], [[16, 16, 3]]),
        "no_images": lambda: [_js(_header(kind, seq=seq, labels=[]))],
        "end_experience": lambda: [_js(_header("end_experience", seq=seq))],
        "status": lambda: [_js(_header("status", seq=seq))],
        "imagezmq_like": lambda: [_js({"msg": "cam", "dtype": ["uint8", "float64", None][int(rng.integers(0, 3))], "shape": [16, 16, 3]}), payloads.raw[: int(rng.integers(0, 800))]],
        "imagezmq_jpeg_garbage": lambda: [_js({"msg": "cam"}), rng.bytes(100)],
    }
    rare = {"huge_part", "too_many_parts", "bomb_16mp_png", "huge_header"}  # big messages: a few percent of the total
    names = list(cases)
    while True:
        name = names[int(rng.integers(0, len(names)))]
        if name not in rare or rng.random() < 0.15:
            return name, cases[name]()


def envelope(rng: np.random.Generator, endpoint: str, parts: list[bytes]) -> list[bytes]:
    """DEALER framing: usually the empty delimiter a REQ peer sends; sometimes none or an extra one."""
    if endpoint == "frames":
        return parts
    roll = rng.random()
    if roll < 0.9:
        return [b"", *parts]
    if roll < 0.95:
        return parts
    return [b"", b"", *parts]


# --------------------------------------------------------------------------- valid traffic


class ValidTraffic(threading.Thread):
    """Valid labeled batches (each must be acked) and predictions (each must be answered) during the fuzzing."""

    def __init__(self, labeled_endpoint: str, serve_endpoint: str, seed: int):
        super().__init__(name="valid-traffic", daemon=True)
        self.labeled_endpoint, self.serve_endpoint = labeled_endpoint, serve_endpoint
        self.rng = np.random.default_rng(seed)
        self.stop = threading.Event()
        self.sent = self.acked = 0
        self.failures: list[str] = []
        self.predictions = self.no_model = 0
        self.inference_failures: list[str] = []
        self.finished = threading.Event()

    def run(self) -> None:
        client = LabeledClient(self.labeled_endpoint, "fuzz-valid", timeout_s=5.0, retries=5, window=1)
        inference = InferenceClient(self.serve_endpoint, timeout_s=5.0, retries=3)
        try:
            # every class name first, so the fuzzer's new names come after the model's classes
            self._send(client, list(range(len(CLASS_NAMES))))
            batches = 0
            while not self.stop.is_set():
                self._send(client, list(self.rng.integers(0, len(CLASS_NAMES), 4)))
                batches += 1
                if batches % 10 == 0:
                    end = client.end_experience()
                    if not end.ok and end.reason != "nothing_to_cut":
                        self.failures.append(f"end_experience nacked: {end.reason}")
                if batches % 3 == 0:
                    self._predict(inference)
                self.stop.wait(0.05)
            self._send(client, [0, 1, 2, 3])  # the last one, after the fuzzing: ingestion still answers
            self._predict(inference)
        except CLAgentError as error:
            self.failures.append(f"{type(error).__name__}: {error}")
        finally:
            client.close()
            inference.close()
            self.finished.set()

    def _send(self, client: LabeledClient, ids: list[int]) -> None:
        images = make_batch(np.asarray(ids), self.rng, 16)
        self.sent += 1
        ack = client.send(list(images), [CLASS_NAMES[c] for c in ids])
        if ack.ok and ack.accepted + ack.duplicate * len(ids) >= len(ids):
            self.acked += 1
        else:
            self.failures.append(f"seq {ack.seq}: {ack.reason} {ack.detail}")

    def _predict(self, inference: InferenceClient) -> None:
        try:
            inference.predict(make_batch(np.asarray([0]), self.rng, 16))
            self.predictions += 1
        except InferenceError as error:
            if error.reason == "no_model":  # an answer: no version published yet
                self.no_model += 1
            else:
                self.inference_failures.append(str(error))


# --------------------------------------------------------------------------- main


def agent_children(pid: int) -> dict[str, int]:
    """The agent's child processes by role: the trainer and the server (spawned in that order) and multiprocessing's resource tracker."""
    roles: dict[str, int] = {}
    workers = []
    for child in sorted(child_pids(pid)):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "resource_tracker" in cmdline:
            roles["resource_tracker"] = child
        else:
            workers.append(child)
    for name, child in zip(("trainer", "server"), workers):
        roles[name] = child
    for child in workers[2:]:
        roles[f"child-{child}"] = child
    return roles



def drain(sockets: dict, replies: Counter, answers: dict[str, Counter]) -> None:
    """Take every reply waiting on the DEALER sockets; count them by endpoint and by kind or refusal reason."""
    for name in ("labeled", "control", "serve"):
        while sockets[name].poll(0):
            parts = sockets[name].recv_multipart()
            replies[name] += 1
            try:
                header = json.loads(parts[-1])
                answers[name][header.get("reason") or header.get("kind", "?")] += 1
            except (ValueError, AttributeError):
                answers[name]["unreadable_reply"] += 1


def _counters_settled(workdir: str, timeout_s: float = 60.0) -> dict:
    """state.json counters once the agent has taken everything (they stop changing), or after the timeout."""
    deadline = time.monotonic() + timeout_s
    last, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        try:
            counters = read_state(workdir)["counters"]
        except (CLAgentError, KeyError, OSError):
            counters = None
        seen = None if counters is None else (counters.get("labeled_messages"), counters.get("frames_received"), counters.get("control_messages"))
        if seen != last:
            last, stable_since = seen, time.monotonic()
        elif counters is not None and time.monotonic() - stable_since > 2.0:
            return counters
        time.sleep(0.25)
    return read_state(workdir).get("counters", {})


def _server_counters(endpoint: str) -> dict:
    try:
        with InferenceClient(endpoint, timeout_s=5.0, retries=2) as client:
            return client.status().get("counters") or {}
    except CLAgentError as error:
        return {"error": str(error)}


def run_fuzz(messages: int = 10_000, seed: int = 0, workdir: Path | None = None, rss_limit_mb: float = RSS_LIMIT_MB) -> dict:
    started = time.monotonic()
    workdir, scratch = run_folder(workdir, "cl-agent-fuzz-")
    workdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    payloads = Payloads(rng)
    cfg, config_path = agent_config(workdir, **{"experience.labeled_samples": 200})
    agent = AgentProcess(config_path, workdir / "agent-process.log")
    say(f"agent pid {agent.pid}, workdir {workdir}; sending {messages} messages")
    address = {
        "labeled": cfg.ingest.labeled_endpoint,
        "frames": cfg.ingest.frame_endpoint,
        "control": cfg.ingest.control_endpoint,
        "serve": cfg.serve.endpoint,
    }
    context = zmq.Context()
    sockets = {}
    for name, endpoint in address.items():
        sock = context.socket(zmq.PUSH if name == "frames" else zmq.DEALER)
        sock.linger = 0
        sock.sndtimeo = 2000  # a send that cannot go out in 2 s is counted and skipped
        sock.sndhwm = 1000
        sock.connect(endpoint)
        sockets[name] = sock
    valid = ValidTraffic(address["labeled"], address["serve"], seed + 1)
    valid.start()
    # the valid client names every class first, so the fuzzer's new class names cannot take the model's places
    deadline = time.monotonic() + 120
    while valid.acked < 1 and not valid.finished.is_set() and time.monotonic() < deadline:
        time.sleep(0.05)
    sent: Counter = Counter()
    by_case: Counter = Counter()
    replies: Counter = Counter()
    answers: dict[str, Counter] = {name: Counter() for name in ("labeled", "control", "serve")}
    send_timeouts = 0
    exit_code = None
    try:
        for i in range(messages):
            endpoint = ENDPOINTS[i % len(ENDPOINTS)]
            case, parts = make_case(rng, payloads, endpoint, seq=1_000_000 + i)
            try:
                sockets[endpoint].send_multipart(envelope(rng, endpoint, parts))
            except zmq.Again:
                send_timeouts += 1
                continue
            sent[endpoint] += 1
            by_case[case] += 1
            drain(sockets, replies, answers)  # so no reply queue fills
            if (i + 1) % 25 == 0:  # valid traffic goes on between the fuzz: at least one valid batch per 25 messages
                target, wait_until = valid.sent + 1, time.monotonic() + 10
                while valid.sent < target and time.monotonic() < wait_until and not valid.finished.is_set():
                    time.sleep(0.01)
            if (i + 1) % 1000 == 0:
                say(f"{i + 1} messages sent; agent alive: {agent.alive()}; valid acked {valid.acked}/{valid.sent}")
            if not agent.alive():
                say("the agent died")
                break
        valid.stop.set()
        valid.finished.wait(120)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            drain(sockets, replies, answers)
            time.sleep(0.1)
        counters = _counters_settled(cfg.agent.workdir)
        server = _server_counters(address["serve"])
        alive = agent.alive()
        rss = {"agent": peak_rss_mb(agent.pid)}
        for name, pid in agent_children(agent.pid).items():
            rss[name] = peak_rss_mb(pid)
        exit_code = agent.terminate(cfg.agent.grace_period_s + 20)
    finally:
        valid.stop.set()
        for sock in sockets.values():
            sock.close(0)
        context.term()
        if agent.alive():
            agent.kill9()
    log = (workdir / "agent-process.log").read_text(errors="replace")
    trainer_crashes = log.count("trainer exited with code")
    server_crashes = log.count("server exited with code")
    peak = max((v for v in rss.values() if v is not None), default=0.0)
    result = {
        "sent": sum(sent.values()),
        "sent_by_endpoint": dict(sent),
        "sent_by_case": dict(sorted(by_case.items())),
        "send_timeouts": send_timeouts,
        "replies_received": dict(replies),
        # what the fuzzer's own messages got back, per endpoint: ack, or the nack/error reason (the server's by reason too)
        "replies_by_reason": {name: dict(sorted(c.items())) for name, c in answers.items()},
        "rejected_by_reason": dict(sorted(counters.get("rejected", {}).items())),
        "rejected_total": sum(counters.get("rejected", {}).values()),
        "agent_counters": {k: counters.get(k) for k in ("labeled_messages", "labeled_acked", "labeled_nacked", "frames_received", "frames_accepted", "frames_rejected", "control_messages", "experiences_cut")},
        "server_counters": server,
        "agent_alive": alive,
        "valid_sent": valid.sent,
        "valid_acked_count": valid.acked,
        "valid_acked": valid.sent > 0 and valid.acked == valid.sent and not valid.failures,
        "valid_failures": valid.failures[:10],
        "predictions_answered": valid.predictions,
        "predictions_no_model_yet": valid.no_model,
        "prediction_failures": valid.inference_failures[:10],
        "trainer_crashes": trainer_crashes,
        "server_crashes": server_crashes,
        "peak_rss_mb": round(peak, 1),
        "peak_rss_mb_by_process": {k: None if v is None else round(v, 1) for k, v in rss.items()},
        "rss_limit_mb": rss_limit_mb,
        "exit_code": exit_code,
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    result["ok"] = bool(
        alive and result["valid_acked"] and not valid.inference_failures and trainer_crashes == 0
        and server_crashes == 0 and exit_code == 0 and peak < rss_limit_mb
    )
    return settle_scratch(result, scratch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000, help="malformed messages to send (default 10000)")
    add_run_options(parser, "folder to run in")
    parser.add_argument("--rss-limit-mb", type=float, default=RSS_LIMIT_MB, help="peak RSS bound per process (MiB)")
    args = parser.parse_args(argv)
    if args.messages < 1:
        parser.error(f"--messages must be >= 1, got {args.messages}")
    result = run_fuzz(args.messages, args.seed, args.workdir, args.rss_limit_mb)
    keys = ("sent", "rejected_total", "agent_alive", "valid_acked", "peak_rss_mb", "exit_code", "wall_seconds")
    return print_result(result, args.json, keys, width=16)


if __name__ == "__main__":
    sys.exit(main())
