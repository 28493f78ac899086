"""Serving benchmark: latency and throughput through the server, against torch eager and bare onnxruntime,
and hot swaps under a steady load.

    python tools/bench_serve.py --json

Prints one JSON object. Model: the student (ResNet-18) at 32 px, exported with
the project's exporter and published to a temporary repository; the server runs
as a separate ``cl-agent serve`` process, the clients run here.

- batch1 / batch32: one client, one request after another; p50/p99 of the round
  trip, throughput in images per second. The flat p50_ms/p99_ms/throughput_per_s
  are batch 1.
- torch_p50_ms / ort_p50_ms: the same graph in torch eager and in a bare
  onnxruntime ``session.run`` with the same thread count, measured interleaved
  with the served requests so background load hits all three alike. torch is the
  student as trained; torch_cropped_p50_ms the same student with the kernel taps
  the export cuts (``cl_agent/crop.py``) cut, for comparison (--no-crop exports
  without the cut).
  ort_after_idle_p50_ms: the bare call after a 0.5 ms sleep, as a server runs it
  between requests (caches no longer hot); server_*_p50 in batch1/batch32: the
  server's own medians of time in session.run and of everything else it did.
- floor_p50_ms / floor_overhead_ms_batch1: the batch-1 round trip through a minimal
  ZeroMQ server in another process (recv, session.run on the served graph, send the
  raw probabilities; no checks, no JSON), in the same interleaved rounds, and its
  excess over the bare call: what the machine costs before any serving code runs.
- steady / swaps: an open-loop load (requests sent on a fixed schedule, replies
  collected asynchronously, latency counted from the scheduled send time) at
  --rate requests/s; without swaps for --steady-s seconds, half before and half
  after the swap phase (steady p99), and in between while a new version
  is published and announced by a thread standing in for the trainer (at nice
  --publisher-nice), which waits until the server answers with it and then
  --swap-interval seconds more before publishing the next. Latencies of the first 0.25 s of each load run
  (connection set-up) are left out; failures are counted over every request.
- providers: what --providers chose (with the server's provider options, as
  cl_agent.session.provider_options gives them, for the bare and minimal sessions
  too); server_providers: what onnxruntime started in the server (it leaves out a
  provider it cannot start).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

SIZE = 32
CLASSES = [f"class_{i}" for i in range(10)]


def percentiles(samples_s: list[float]) -> dict:
    ms = np.asarray(samples_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 4), "p99_ms": round(float(np.percentile(ms, 99)), 4)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def optimized_path(path: Path) -> Path:
    """Where ``build_models`` saves the optimised graph of the model at ``path`` (a folder of its own:
    the graph names its weights file, so both keep the names they are published under)."""
    from cl_agent.repository import OPTIMIZED_FILE

    return path.parent / path.stem / OPTIMIZED_FILE


def build_models(folder: Path, threads: int, count: int = 2, crop: bool = True) -> tuple[dict, list[Path]]:
    """``count`` students with different weights, exported (with their optimised graphs at ``optimized_path``;
    ``crop``: export.crop_padding_taps); returns (torch graphs of the first: "torch" as trained, "torch_cropped"
    with the taps the export cuts cut, onnx paths)."""
    import copy

    import torch

    from cl_agent.crop import crop_padding_taps

    from cl_agent.config import ExportSection, ModelSection
    from cl_agent.export import ServingGraph, export_onnx
    from cl_agent.student import create_student

    section = ModelSection(backbone="resnet18", num_classes=len(CLASSES), image_size=SIZE)
    paths, graphs = [], []
    for seed in range(count):
        torch.manual_seed(seed)
        student = create_student(section).eval()
        path = folder / f"student{seed}.onnx"
        export_onnx(
            [student], path, image_size=SIZE, mean=section.mean, std=section.std,
            export=ExportSection(crop_padding_taps=crop), optimized_path=optimized_path(path),
        )
        paths.append(path)
        graphs.append(student)
    cropped = copy.deepcopy(graphs[0])
    crop_padding_taps(cropped, torch.zeros(1, 3, SIZE, SIZE))
    torch.set_num_threads(threads)
    eager = {"torch": graphs[0], "torch_cropped": cropped}
    return {name: ServingGraph([m], section.mean, section.std).eval() for name, m in eager.items()}, paths


def bare_session(path: Path, threads: int, pre_optimized: bool = False, providers: list[str] | None = None):
    """A plain onnxruntime session (CPU unless ``providers`` says otherwise) with ``threads`` intra-op threads
    that sleep between calls (as the server's); ``pre_optimized``: a saved optimised graph, opened without
    optimising it again, as served."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    if pre_optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    from cl_agent.config import ServeSection
    from cl_agent.session import provider_options

    chosen = provider_options(providers or ["CPUExecutionProvider"], SIZE, ServeSection().max_batch)  # the server's options
    return ort.InferenceSession(str(path), options, providers=chosen)


def start_server(
    repo_root: Path, endpoint: str, announce: str, threads: int, busy_poll_us: int, max_wait_ms: float, loader_pause_us: int,
    providers: list[str] | None = None,
) -> subprocess.Popen:
    """`cl-agent serve` on ``repo_root`` as its own process; ``providers`` as ``serve.providers`` (None = auto)."""
    command = [
        sys.executable, "-m", "cl_agent.cli", "serve", "--repo", str(repo_root), "--model", "student",
        "--set", f"serve.providers={json.dumps(providers or ['auto'])}",
        "--set", f"serve.endpoint={endpoint}",
        "--set", f"serve.intra_op_threads={threads}",
        "--set", "serve.poll_s=5.0",
        "--set", f"repository.announce_endpoint={announce}",
        "--set", "agent.log_level=warning",
        "--set", f"serve.busy_poll_us={busy_poll_us}",
        "--set", f"serve.max_wait_ms={max_wait_ms}",
        "--set", f"serve.loader_pause_us={loader_pause_us}",
    ]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def measure_latency(
    client, torch_graphs: dict, session, batch: int, rounds: int, per_round: int, floor: MinimalServer | None = None, device: str = "cpu"
) -> dict:
    """Interleaved rounds of served / bare onnxruntime / torch eager calls (and ``floor`` round trips) on the same images.

    ``device``: where the torch graphs are; on a GPU each eager call is timed to the end of its work
    (the tensor is there already, as a torch server would have it after decoding)."""
    import torch

    images = np.random.default_rng(batch).integers(0, 256, (batch, SIZE, SIZE, 3), dtype=np.uint8)
    tensor = torch.from_numpy(images).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    served, bare, after_idle, minimal = [], [], [], []
    eager = {name: [] for name in torch_graphs}
    served_time = 0.0
    for _ in range(3):  # warm-up
        client.predict(images)
        if floor is not None:
            floor.call(images)
        session.run(["probs"], {"images": images})
        with torch.inference_mode():
            for graph in torch_graphs.values():
                graph(tensor)
    before = client.status(reset_recent=True)["counters"]
    for _ in range(rounds):
        round_start = time.perf_counter()
        for _ in range(per_round):
            t = time.perf_counter()
            client.predict(images)
            served.append(time.perf_counter() - t)
        served_time += time.perf_counter() - round_start
        if floor is not None:
            for _ in range(per_round):
                t = time.perf_counter()
                floor.call(images)
                minimal.append(time.perf_counter() - t)
        for _ in range(per_round):
            t = time.perf_counter()
            session.run(["probs"], {"images": images})
            bare.append(time.perf_counter() - t)
        # The same call after a short idle gap, as a server sees it between requests (colder caches).
        for _ in range(per_round // 2):
            time.sleep(0.0005)
            t = time.perf_counter()
            session.run(["probs"], {"images": images})
            after_idle.append(time.perf_counter() - t)
        with torch.inference_mode():
            for name, graph in torch_graphs.items():
                for _ in range(max(1, per_round // 5)):
                    t = time.perf_counter()
                    graph(tensor)
                    sync()
                    eager[name].append(time.perf_counter() - t)
    status = client.status()
    after = status["counters"]
    result = percentiles(served)
    result["throughput_per_s"] = round(len(served) * batch / served_time, 1)
    result["requests"] = len(served)
    # The server's own account, per batch: time in session.run, and everything else it did.
    batches = after["batches"] - before["batches"]
    inference = after["inference_s"] - before["inference_s"]
    result["server_inference_ms_mean"] = round(1000 * inference / batches, 4)
    result["server_handling_ms_mean"] = round(1000 * (after["busy_s"] - before["busy_s"] - inference) / batches, 4)
    result["server_inference_ms_p50"] = status.get("inference_ms_p50")
    result["server_handling_ms_p50"] = status.get("handling_ms_p50")
    result["busy_poll_hits"] = after["busy_poll_hits"] - before["busy_poll_hits"]  # requests found while spinning
    measured = {"served": result, "ort": percentiles(bare), "ort_after_idle": percentiles(after_idle)}
    measured.update({name: percentiles(samples) for name, samples in eager.items()})
    if floor is not None:
        measured["floor"] = percentiles(minimal)
    return measured


def minimal_server(endpoint: str, graph: str, pre_optimized: bool, threads: int, providers: list[str], conn) -> None:
    """Child process: the least a ZeroMQ server can do per request (recv, ``session.run``, send the
    probabilities' bytes), on the graph the server opens and with its busy-polling; no checks, no JSON.

    The floor under the server's batch-1 overhead on this machine: what two processes, their ZeroMQ
    I/O threads and a ``session.run`` that is not back to back cost before any serving code runs.
    """
    import zmq

    session = bare_session(Path(graph), threads, pre_optimized, providers)
    session.run(["probs"], {"images": np.zeros((1, SIZE, SIZE, 3), np.uint8)})
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    conn.send("ready")
    while not conn.poll():
        spin_until = time.perf_counter() + 0.001
        while not router.poll(0) and time.perf_counter() < spin_until:
            pass
        if not router.poll(100):
            continue
        frames = router.recv_multipart()
        image = np.frombuffer(frames[-1], np.uint8).reshape(1, SIZE, SIZE, 3)
        (probs,) = session.run(["probs"], {"images": image})
        router.send_multipart([*frames[:-1], probs.tobytes()])
    router.close()


class MinimalServer:
    """``minimal_server`` in a child process, and a REQ socket to it: ``call(image)`` is one round trip."""

    def __init__(self, graph: Path, pre_optimized: bool, threads: int, providers: list[str]):
        import zmq

        ctx = multiprocessing.get_context("spawn")
        self._pipe, child = ctx.Pipe()
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        self._process = ctx.Process(target=minimal_server, args=(endpoint, str(graph), pre_optimized, threads, providers, child))
        self._process.start()
        assert self._pipe.recv() == "ready"
        self._socket = zmq.Context.instance().socket(zmq.REQ)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.connect(endpoint)

    def call(self, image: np.ndarray) -> None:
        self._socket.send_multipart([b"", image.tobytes()])
        self._socket.recv_multipart()

    def close(self) -> None:
        self._socket.close()
        self._pipe.send("stop")
        self._process.join(10)


def open_loop_load(endpoint: str, rate: float, max_s: float, timeout_s: float, conn) -> None:
    """Child process: send batch-1 requests on a fixed schedule over one DEALER socket until told to stop."""
    import zmq

    from cl_agent.config import WireSection
    from cl_agent.wire import decode_message, encode_message

    limits = WireSection()
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    image = np.random.default_rng(0).integers(0, 256, (1, SIZE, SIZE, 3), dtype=np.uint8)
    interval = 1.0 / rate
    scheduled: dict[int, float] = {}
    done: dict[int, tuple[float, int]] = {}  # seq -> (latency, version or -1 on an error reply)
    conn.send("ready")
    start = time.perf_counter() + 0.05
    seq = 0
    sending_until = start + max_s
    while True:
        now = time.perf_counter()
        if now < sending_until and conn.poll():
            conn.recv()  # "stop"
            sending_until = now
        if now >= sending_until and (len(done) == seq or now >= sending_until + timeout_s):
            break
        next_send = start + seq * interval
        if now >= next_send and now < sending_until:
            scheduled[seq] = next_send
            sock.send_multipart(encode_message("infer", "load", seq, list(image), encoding="raw", top_k=1))
            seq += 1
            continue
        wait_ms = max(0.0, min(next_send - now, 0.01) * 1000)
        if sock.poll(wait_ms):
            frames = sock.recv_multipart()
            received = time.perf_counter()
            message = decode_message(frames, limits)
            version = int(message.header["model_version"]) if message.kind == "prediction" else -1
            done[message.seq] = (received - scheduled[message.seq], version)
    conn.send({"scheduled": {k: v - start for k, v in scheduled.items()}, "done": done, "total": seq})
    conn.close()


def run_load(endpoint: str, rate: float, during) -> dict:
    """Run the load in a child process while ``during()`` runs; return per-request results."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=open_loop_load, args=(endpoint, rate, 600.0, 5.0, child))
    process.start()
    assert parent.recv() == "ready"
    during()
    parent.send("stop")
    result = parent.recv()
    process.join()
    return result


def summarise(results: list[dict], warmup_s: float = 0.25) -> dict:
    """One summary over load runs: failures over every request; latencies without each run's first ``warmup_s``."""
    total = failed = changes = 0
    seconds = 0.0
    latencies: list[float] = []
    versions: set[int] = set()
    for result in results:
        done, scheduled = result["done"], result["scheduled"]
        total += result["total"]
        failed += result["total"] - sum(1 for _, version in done.values() if version >= 0)
        latencies += [lat for seq, (lat, version) in done.items() if version >= 0 and scheduled[seq] >= warmup_s]
        ordered = [done[s][1] for s in sorted(done) if done[s][1] >= 0]
        changes += sum(1 for a, b in zip(ordered, ordered[1:]) if b != a)
        versions.update(ordered)
        seconds += max(scheduled.values(), default=0.0)
    summary = {
        "requests": total,
        "failed_requests": failed,
        "seconds": round(seconds, 2),
        "rate_per_s": round(total / seconds, 1) if seconds else None,
        "version_changes": changes,
    }
    summary.update(percentiles(latencies) if latencies else {"p50_ms": None, "p99_ms": None})
    summary["versions_seen"] = sorted(versions)
    return summary


def main() -> int:
    from cl_agent.config import RepositorySection, ServeSection

    serve_defaults = ServeSection()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (server and bare) and torch threads")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved measurement rounds per batch size")
    parser.add_argument("--rate", type=float, default=250.0, help="requests/s of the steady load")
    parser.add_argument("--steady-s", type=float, default=8.0, help="seconds of steady load without swaps (half before, half after the swaps)")
    parser.add_argument("--swaps", type=int, default=12, help="versions to publish under load")
    parser.add_argument("--swap-interval", type=float, default=0.3, help="seconds a version serves before the next is published")
    parser.add_argument("--busy-poll-us", type=int, default=serve_defaults.busy_poll_us, help="the server's serve.busy_poll_us")
    parser.add_argument("--max-wait-ms", type=float, default=serve_defaults.max_wait_ms, help="the server's serve.max_wait_ms")
    parser.add_argument("--no-optimized", dest="optimized", action="store_false", help="publish model.onnx only (every swap optimises the graph again)")
    parser.add_argument(
        "--providers", default="auto",
        help="onnxruntime providers of the server, the bare session and the minimal server, comma-separated; auto = as serve.providers: "
        "TensorRT/CUDA when installed, else CPU (torch eager then runs on the GPU too)",
    )
    parser.add_argument("--no-crop", dest="crop", action="store_false", help="export without cutting padding-only kernel taps")
    parser.add_argument("--client-spin-us", type=int, default=0, help="InferenceClient spin_us of the measuring client (0 = sleeps in poll)")
    parser.add_argument("--publisher-nice", type=int, default=10, help="nice value of the publishing thread (0 = same as the server)")
    parser.add_argument(
        "--publish-pause-us", type=int, default=RepositorySection().publish_pause_us, help="repository.publish_pause_us of the publisher (0 = copies at full speed)"
    )
    parser.add_argument("--loader-pause-us", type=int, default=serve_defaults.loader_pause_us, help="the server's serve.loader_pause_us")
    args = parser.parse_args()

    from cl_agent.inference import InferenceClient
    from cl_agent.repository import Announcer, ModelRepository, OptimizedModel
    from cl_agent.errors import CLAgentError
    from cl_agent.session import choose_providers, runtime_environment

    say = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr))
    requested = [p.strip() for p in args.providers.split(",") if p.strip()]
    try:
        providers = choose_providers(requested)
    except CLAgentError as e:
        parser.error(f"--providers: {e}")
    on_cpu = providers == ["CPUExecutionProvider"]  # the saved optimised graph is for the CPU (as the server decides)
    device = "cpu"
    if providers[0] in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"  # torch eager where the served graph runs
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        say("exporting two students ...")
        torch_graphs, paths = build_models(tmp, args.threads, crop=args.crop)
        torch_graphs = {name: graph.to(device) for name, graph in torch_graphs.items()}
        repo = ModelRepository(tmp / "models", "student", keep_last=3, pause_s=args.publish_pause_us / 1e6)
        manifest = {"class_names": CLASSES, "image_size": SIZE}
        environment = runtime_environment()

        def optimized(path: Path):
            return OptimizedModel(optimized_path(path), environment) if args.optimized else None

        repo.publish(paths[0], manifest, optimized(paths[0]))
        announcer = Announcer(f"tcp://127.0.0.1:{free_port()}")
        endpoint = f"tcp://127.0.0.1:{free_port()}"
        server = start_server(tmp / "models", endpoint, announcer.endpoint, args.threads, args.busy_poll_us, args.max_wait_ms, args.loader_pause_us, requested)
        try:
            client = InferenceClient(endpoint, timeout_s=2, retries=30, spin_us=args.client_spin_us)
            client.predict(np.zeros((1, SIZE, SIZE, 3), np.uint8))  # waits until the server is up
            session = bare_session(paths[0], args.threads, providers=providers)

            say("latency at batch 1 (and through a minimal server) and at batch 32 ...")
            pre_optimized = args.optimized and on_cpu
            minimal = MinimalServer(optimized_path(paths[0]) if pre_optimized else paths[0], pre_optimized, args.threads, providers)
            try:
                b1 = measure_latency(client, torch_graphs, session, 1, args.rounds, 100, floor=minimal, device=device)
            finally:
                minimal.close()
            b32 = measure_latency(client, torch_graphs, session, 32, args.rounds, 10, device=device)

            say(f"steady open-loop load at {args.rate:.0f} req/s ...")
            # Steady load in two halves, before and after the swaps, so a drift in the background
            # load over the run weighs on both figures alike.
            steady_runs = [run_load(endpoint, args.rate, lambda: time.sleep(args.steady_s / 2))]

            published: list[int] = []
            probe_failures: list[str] = []

            def publish_loop() -> None:
                # The publisher stands in for the trainer, which a deployment runs at a lower
                # priority than the server it shares the cores with.
                if args.publisher_nice:
                    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), args.publisher_nice)
                probe = InferenceClient(endpoint, timeout_s=5, retries=0)
                time.sleep(0.5)
                for k in range(args.swaps):
                    version = repo.publish(paths[(k + 1) % 2], manifest, optimized(paths[(k + 1) % 2]))
                    announcer.announce("student", version, repo.load_manifest(version)["sha256"])
                    published.append(version)
                    # Wait until the server answers with the new version, then leave it serving a while.
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        try:
                            if probe.predict(np.zeros((1, SIZE, SIZE, 3), np.uint8)).model_version == version:
                                break
                        except Exception as e:  # counted as a failed request
                            probe_failures.append(repr(e))
                        time.sleep(0.02)
                    time.sleep(args.swap_interval)
                probe.close()

            def publish_versions() -> None:
                thread = threading.Thread(target=publish_loop)
                thread.start()
                thread.join()

            say(f"{args.swaps} swaps under the same load ...")
            swaps = summarise([run_load(endpoint, args.rate, publish_versions)])
            say("steady load again ...")
            steady_runs.append(run_load(endpoint, args.rate, lambda: time.sleep(args.steady_s / 2)))
            steady = summarise(steady_runs)
            final_status = client.status()
            server_optimized = final_status.get("model_optimized")
            server_providers = final_status.get("model_providers")  # what onnxruntime started (it leaves out one it cannot)
            swaps["failed_requests"] += len(probe_failures)
            client.close()
        finally:
            server.terminate()
            _, stderr = server.communicate(timeout=30)
            announcer.close()
    if server.returncode != 0:
        print(stderr.decode(), file=sys.stderr)

    batch1 = b1["served"]
    batch32 = b32["served"]
    report = {
        "model": "resnet18 (cl_agent.student) at 32 px, 10 classes, fp32",
        "providers": providers,
        "server_providers": server_providers,
        "torch_device": device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),
        "threads": args.threads,
        "batch1": batch1,
        "batch32": batch32,
        "p50_ms": batch1["p50_ms"],
        "p99_ms": batch1["p99_ms"],
        "throughput_per_s": batch1["throughput_per_s"],
        "torch_p50_ms": b1["torch"]["p50_ms"],
        "torch_batch32_p50_ms": b32["torch"]["p50_ms"],
        "torch_cropped_p50_ms": b1["torch_cropped"]["p50_ms"],
        "torch_cropped_batch32_p50_ms": b32["torch_cropped"]["p50_ms"],
        "cropped_export": args.crop,
        "ort_p50_ms": b1["ort"]["p50_ms"],
        "ort_batch32_p50_ms": b32["ort"]["p50_ms"],
        "ort_after_idle_p50_ms": b1["ort_after_idle"]["p50_ms"],
        "ort_after_idle_batch32_p50_ms": b32["ort_after_idle"]["p50_ms"],
        "served_over_torch_batch1": round(batch1["p50_ms"] / b1["torch"]["p50_ms"], 3),
        "overhead_ms_batch1": round(batch1["p50_ms"] - b1["ort"]["p50_ms"], 4),
        "overhead_pct_batch32": round(100 * (batch32["p50_ms"] / b32["ort"]["p50_ms"] - 1), 2),
        "floor_p50_ms": b1["floor"]["p50_ms"],
        "floor_overhead_ms_batch1": round(b1["floor"]["p50_ms"] - b1["ort"]["p50_ms"], 4),
        "steady": steady,
        "steady_p99_ms": steady["p99_ms"],
        "swaps": swaps["version_changes"],
        "requests_during_swaps": swaps["requests"],
        "failed_requests": swaps["failed_requests"] + steady["failed_requests"],
        "p99_during_swaps_ms": swaps["p99_ms"],
        "p50_during_swaps_ms": swaps["p50_ms"],
        "swap_load_rate_per_s": args.rate,
        "versions_published": len(published) + 1,
        "publisher_nice": args.publisher_nice,
        "publish_pause_us": args.publish_pause_us,
        "loader_pause_us": args.loader_pause_us,
        "busy_poll_us": args.busy_poll_us,
        "client_spin_us": args.client_spin_us,
        "max_wait_ms": args.max_wait_ms,
        "optimized_graphs_published": args.optimized,
        "server_opened_optimized": server_optimized,
        "server_exit_code": server.returncode,
    }
    report["targets_met"] = {
        "served_p50_batch1_le_0.25x_torch": report["served_over_torch_batch1"] <= 0.25,
        "overhead_batch1_le_0.3ms": report["overhead_ms_batch1"] <= 0.3,
        "overhead_batch32_le_10pct": report["overhead_pct_batch32"] <= 10,
        "swaps_ge_10": report["swaps"] >= 10,
        "zero_failed_requests": report["failed_requests"] == 0,
        "p99_during_swaps_le_2x_steady": swaps["p99_ms"] is not None and swaps["p99_ms"] <= 2 * steady["p99_ms"],
    }
    print(json.dumps(report, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
