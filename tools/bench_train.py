#!/usr/bin/env python
"""Price one training step of the method against the work it cannot avoid.

naive_step_s:    a plain cross-entropy step on `labeled_batch` labeled images.
mlkd_ssl_step_s: a full method step at t = 2: 3 teachers (EMA + 2 snapshots),
                 labeled + unlabeled images through the student (the batch the teachers
                 see), the 4 x rotation images in a student pass of their own,
                 memory replay, EMA update, optimizer step.
floor_step_s:    the student's forward+backward time per image x the images it must
                 pass (64 + 100, then 100) + the forward time per image x the teachers'
                 images (3 x 164), both measured in this run at the same batch sizes.
overhead:        mlkd_ssl_step_s / floor_step_s.

--nproc N: the naive and mlkd_ssl steps in one process, then in N processes
(DistributedDataParallel; gloo on the CPU, NCCL with one GPU per process), each
process with the one-process batches (the global batch is N times larger).
images/s counts labeled images of the global batch; scaling efficiency =
images/s with N processes / (N x images/s with one).

Usage: python tools/bench_train.py --json [--device cpu|cuda] [--backbone resnet18] [--image-size 32] [--nproc N]
       torchrun --nproc_per_node N tools/bench_train.py --json   (images/s of the N processes only)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cl_agent import distributed
from cl_agent.config import ModelSection, TrainSection
from cl_agent.teacher import teacher_outputs
from cl_agent.device import resolve_device
from cl_agent.trainer import Trainer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_interleaved(fns: dict, device: torch.device, repeats: int, warmup: int) -> dict:
    """Median seconds of each fn, measured in rounds (one call of each per round), so that
    load from other processes on a shared machine affects every figure alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _images(n: int, size: int, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=gen).to(device)


def _experienced_trainer(model: ModelSection, train: TrainSection, device, labeled, labels, unlabeled) -> Trainer:
    """The method at t = 2: two tiny experiences first, so 2 snapshots and a filled memory exist."""
    method = Trainer(model, train, device=device)
    for t in range(2):
        method.train_experience(labeled.cpu(), labels.cpu() + 10 * (t + 1), unlabeled.cpu(), steps=1)
    method.begin_experience(labels + 30)
    assert len(method.teachers.modules()) == 3 and len(method.memory) > 0
    return method


def step_throughput(args, nproc: int, device: torch.device) -> dict:
    """Median naive and mlkd_ssl step times with the global batches of nproc processes; labeled images/s."""
    model = ModelSection(backbone=args.backbone, num_classes=args.num_classes, image_size=args.image_size)
    one = TrainSection(compile=args.compile, snapshot_mode=args.snapshot_mode)
    train = dataclasses.replace(
        one, nproc=nproc, labeled_batch=nproc * one.labeled_batch, unlabeled_batch=nproc * one.unlabeled_batch,
        rotation_images=nproc * one.rotation_images,
    )
    gen = torch.Generator().manual_seed(0)
    s, nl, nu = args.image_size, train.labeled_batch, train.unlabeled_batch
    labeled, labels = _images(nl, s, device, gen), torch.randint(0, 10, (nl,), generator=gen).to(device)
    unlabeled = _images(nu, s, device, gen)
    naive = Trainer(model, dataclasses.replace(train, method="naive"), device=device)
    naive.begin_experience(labels)
    method = _experienced_trainer(model, train, device, labeled, labels, unlabeled)
    timed = _time_interleaved(
        {"naive": lambda: naive.step(labeled, labels, unlabeled[:0]), "method": lambda: method.step(labeled, labels + 30, unlabeled)},
        device,
        args.repeats,
        args.warmup,
    )
    return {
        "nproc": nproc,
        "labeled_batch": nl,
        "naive_step_s": round(timed["naive"], 4),
        "mlkd_ssl_step_s": round(timed["method"], 4),
        "naive_images_per_s": round(nl / timed["naive"], 1),
        "mlkd_ssl_labeled_images_per_s": round(nl / timed["method"], 1),
    }


def _rank(args, out: str) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    world, device = distributed.init_from_env(args.device)
    result = step_throughput(args, world.size, device)
    if world.main:
        Path(out).write_text(json.dumps(result))


def multi_process(args) -> dict | None:
    """One process, then args.nproc processes; images/s of each and the scaling efficiency (None on ranks > 0)."""
    if "RANK" in os.environ:  # started by torchrun: this process is one rank; no one-process figure to compare with
        world, device = distributed.init_from_env(args.device)
        multi = step_throughput(args, world.size, device)
        torch.distributed.destroy_process_group()
        return {"multi": multi, "efficiency": None} if world.main else None
    device = resolve_device(args.device)
    single = step_throughput(args, 1, device)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        distributed.spawn(_rank, args.nproc, (args, out))
        multi = json.loads(Path(out).read_text())
    efficiency = {
        name: round(multi[name] / (args.nproc * single[name]), 3) for name in ("naive_images_per_s", "mlkd_ssl_labeled_images_per_s")
    }
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads or torch.get_num_threads()} threads per process)",
        "backbone": args.backbone,
        "image_size": args.image_size,
        "single": single,
        "multi": multi,
        "efficiency": efficiency,
        "torch": torch.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student")
    parser.add_argument("--snapshot-mode", default="frozen", choices=["frozen", "ema"])
    parser.add_argument("--nproc", type=int, default=1, help="also run the step in N processes (DDP) and report the scaling")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.nproc > 1 or "RANK" in os.environ:
        result = multi_process(args)
        if result is not None:
            print(json.dumps(result) if args.json else json.dumps(result, indent=1))
        return

    device = resolve_device(args.device)
    model = ModelSection(backbone=args.backbone, num_classes=args.num_classes, image_size=args.image_size)
    train = TrainSection(compile=args.compile, snapshot_mode=args.snapshot_mode)
    gen = torch.Generator().manual_seed(0)
    s, nl, nu, nr = args.image_size, train.labeled_batch, train.unlabeled_batch, train.rotation_images
    labeled, labels = _images(nl, s, device, gen), torch.randint(0, 10, (nl,), generator=gen).to(device)
    unlabeled = _images(nu, s, device, gen)

    # naive: one plain cross-entropy step
    naive = Trainer(model, TrainSection(method="naive", compile=args.compile), device=device)
    naive.begin_experience(labels)

    method = _experienced_trainer(model, train, device, labeled, labels, unlabeled)
    teachers = method.teachers.modules()

    # the floor, priced with the same networks and batch sizes
    student_images = nl + nu + 4 * nr
    x_student = method._input(_images(student_images, s, device, gen))
    x_teacher = method._input(_images(nl + nu, s, device, gen))

    def student_pass() -> None:
        method.student.zero_grad(set_to_none=True)
        with method._autocast():
            features = method.features(x_student)
            loss = method.student.forward_head(features).float().logsumexp(1).mean()
        loss.backward()

    def teacher_pass() -> None:
        with method._autocast():
            teacher_outputs(teachers[:1], x_teacher, train.teacher_batch_statistics)

    timed = _time_interleaved(
        {
            "naive": lambda: naive.step(labeled, labels, unlabeled[:0]),
            "method": lambda: method.step(labeled, labels + 30, unlabeled),
            "student": student_pass,
            "teacher": teacher_pass,
        },
        device,
        args.repeats,
        args.warmup,
    )
    naive_step, method_step = timed["naive"], timed["method"]
    fwd_bwd_per_image = timed["student"] / student_images
    fwd_per_image = timed["teacher"] / (nl + nu)
    floor = fwd_bwd_per_image * student_images + fwd_per_image * len(teachers) * (nl + nu)

    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "backbone": args.backbone,
        "image_size": s,
        "naive_step_s": round(naive_step, 4),
        "mlkd_ssl_step_s": round(method_step, 4),
        "floor_step_s": round(floor, 4),
        "overhead": round(method_step / floor, 3),
        "student_fwd_bwd_per_image_s": fwd_bwd_per_image,
        "forward_per_image_s": fwd_per_image,
        "naive_images_per_s": round(nl / naive_step, 1),
        "mlkd_ssl_labeled_images_per_s": round(nl / method_step, 1),
        "mlkd_ssl_network_images_per_s": round((student_images + len(teachers) * (nl + nu)) / method_step, 1),
        "amp_bf16": device.type == "cuda" and train.amp,
        "channels_last": device.type == "cuda" and train.channels_last,
        "compile": args.compile,
        "snapshot_mode": args.snapshot_mode,
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:32s} {value}")


if __name__ == "__main__":
    main()
