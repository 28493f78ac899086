"""Multi-process updates: the process group, shards of a global batch, and the collectives the trainer needs.

One update can run in ``nproc`` processes (``torchrun``, or ``spawn`` below), one
per GPU with NCCL, or several on the CPU with gloo. Every rank holds the whole
trainer state; what differs between ranks is only which rows of each global
batch they pass through the student.

INVARIANT: after every step, every rank holds bitwise the same student,
optimizer state, teachers, memory and shared generator; any collective is
called by every rank in the same order (decisions that lead to one depend
only on replicated values such as global batch sizes).

Run one update on the synthetic stream (for tests and benchmarks)::

    torchrun --nproc_per_node 2 -m cl_agent.distributed --steps 4 --out runs/ddp
    python -m cl_agent.distributed --nproc 2 --steps 4 --out runs/ddp   # spawns the processes itself
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cl_agent.errors import CLAgentError

MIN_ROWS_PER_RANK = 2  # a shard smaller than this would leave BN a single image on a 1x1 feature map


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one update; the default is a single process."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the only one that writes checkpoints and talks to the outside."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard_sizes(self, n: int) -> list[int]:
        """Rows of a global batch of n per rank: contiguous near-equal parts, earlier ranks take the extra rows.

        A batch too small to give every rank MIN_ROWS_PER_RANK rows is not split:
        every rank takes all of it (its terms are then replicated, and averaging
        replicated gradients gives the single-process gradient).
        """
        if n < MIN_ROWS_PER_RANK * self.size:
            return [n] * self.size
        return [n // self.size + (1 if r < n % self.size else 0) for r in range(self.size)]

    def shard(self, n: int) -> slice:
        """This rank's rows of a global batch of n (all of them in a single process)."""
        sizes = self.shard_sizes(n)
        if sizes[0] == n:
            return slice(0, n)
        start = sum(sizes[: self.rank])
        return slice(start, start + sizes[self.rank])

    def gather_rows(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """This rank's shard (n_r, ...) of a global batch of n -> the whole batch (n, ...) in rank order, on every rank."""
        sizes = self.shard_sizes(n)
        if sizes[0] == n:  # not split (or a single process): every rank holds it all
            return x
        if x.shape[0] != sizes[self.rank]:
            raise ValueError(f"rank {self.rank} holds {x.shape[0]} rows of a batch of {n}, expected {sizes[self.rank]}")
        padded = x.new_zeros((max(sizes), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def average(self, values: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a tensor every rank holds (itself in a single process)."""
        if not self.active:
            return values
        total = values.clone()
        dist.all_reduce(total)
        return total / self.size

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (decisions that must agree, e.g. a time budget spent)."""
        if not self.active:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def broadcast_buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BN running statistics) to every rank, so the EMA and checkpoints see one student."""
        if not self.active:
            return
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def current_world() -> World:
    """The running process group, or a single process when none is initialised."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def rank_device(device: torch.device, world: World) -> torch.device:
    """The device of this rank: a bare "cuda" becomes the local GPU (LOCAL_RANK) when several processes run."""
    if device.type == "cuda" and device.index is None and world.active:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", world.rank)))
    return device


def rank_seed(seed: int, rank: int, experience: int) -> int:
    """A seed of its own for each rank's augmentation in each experience (stable across runs and restarts)."""
    digest = hashlib.sha256(f"augment:{seed}:{rank}:{experience}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def synchronised_batchnorm(student: nn.Module, device: torch.device, world: World) -> nn.Module:
    """On CUDA with several processes, BN layers -> SyncBatchNorm (statistics over the global batch).

    PyTorch's SyncBatchNorm runs on GPUs only; on the CPU (gloo) each rank
    normalises with its own shard's statistics and the student is returned as is.
    """
    if world.active and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(student)
    return student


def plain_batchnorm(module: nn.Module) -> nn.Module:
    """SyncBatchNorm layers -> BatchNorm2d with the same parameters and statistics (for inference and export)."""
    for name, child in module.named_children():
        if isinstance(child, nn.SyncBatchNorm):
            plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            plain.load_state_dict(child.state_dict())
            plain.train(child.training)
            plain.requires_grad_(any(p.requires_grad for p in child.parameters()))
            setattr(module, name, plain.to(child.weight.device if child.affine else "cpu"))
        else:
            plain_batchnorm(child)
    return module


def data_parallel(module: nn.Module, device: torch.device, world: World) -> nn.Module:
    """DistributedDataParallel around ``module`` when several processes run; the module itself otherwise.

    Unused parameters are allowed (the rotation head of methods without SSL, or
    of a step without unlabeled frames); buffers are synchronised at
    construction but not at every forward: the trainer broadcasts them once
    after each step (``World.broadcast_buffers``).
    """
    if not world.active:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        return ddp(module, device_ids=device_ids, find_unused_parameters=True, forward_sync_buffers=False)
    # Older torch: broadcast_buffers=False also skips the buffer sync at construction; do it here.
    world.broadcast_buffers(module)
    return ddp(module, device_ids=device_ids, find_unused_parameters=True, broadcast_buffers=False)


def check_agent_nproc(nproc: int) -> None:
    """Refuse train.nproc > 1 for ``cl-agent run``: its trainer is one process (ingestion, export and publishing live beside it)."""
    if nproc != 1:
        raise CLAgentError(
            f"train.nproc = {nproc}: `cl-agent run` trains in one process; set train.nproc = 1. "
            f"A multi-process update runs under torchrun: torchrun --nproc_per_node {nproc} -m cl_agent.distributed ... "
            f"(see docs/method.md, Distributed updates)"
        )


# --------------------------------------------------------------------------- processes


def init_from_env(device: str = "auto") -> tuple[World, torch.device]:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    NCCL on CUDA, gloo on the CPU. Without RANK in the environment: a single process.
    """
    from cl_agent.device import resolve_device

    resolved = resolve_device(device)
    if "RANK" not in os.environ:
        return World(), resolved
    for key in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise CLAgentError(f"RANK is set but {key} is not: start the processes with torchrun")
    backend = "nccl" if resolved.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    world = current_world()
    resolved = rank_device(resolved, world)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    return world, resolved


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank: int, nproc: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        fn(*args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn: Callable, nproc: int, args: tuple = ()) -> None:
    """Run ``fn(*args)`` in nproc fresh processes set up like torchrun's (loopback, a free port); wait for all.

    ``fn`` must be importable (a module-level function) and call ``init_from_env``.
    """
    if nproc < 1:
        raise CLAgentError(f"nproc = {nproc}: must be >= 1")
    mp.start_processes(_spawned, args=(nproc, free_port(), fn, args), nprocs=nproc, join=True, start_method="spawn")


# --------------------------------------------------------------------------- one update on the synthetic stream


def synthetic_experience(num_classes: int, image_size: int, labeled: int, unlabeled: int, seed: int):
    """uint8 labeled (N, S, S, 3), int64 labels, uint8 unlabeled (M, S, S, 3) of the built-in shapes stream."""
    import numpy as np

    from cl_agent import synthetic

    rng = np.random.default_rng(seed)
    labels = np.arange(labeled) % num_classes
    images = synthetic.make_batch(labels, rng, size=image_size)
    frames = synthetic.make_batch(rng.integers(0, num_classes, unlabeled), rng, size=image_size)
    return torch.from_numpy(images), torch.from_numpy(labels).long(), torch.from_numpy(frames)


def run_update(options: dict) -> None:
    """One rank of ``python -m cl_agent.distributed``: train the synthetic experiences, write the results.

    Rank 0 writes ``checkpoint.pt`` and ``result.json`` in ``options["out"]``;
    with ``every_rank`` each rank also writes ``rank-<r>.pt`` (its whole state, to compare ranks).
    """
    from cl_agent.checkpoint import save_state
    from cl_agent.config import ModelSection, TrainSection
    from cl_agent.trainer import Trainer

    if options.get("threads"):
        torch.set_num_threads(options["threads"])
    world, device = init_from_env(options["device"])
    model = ModelSection(backbone=options["backbone"], num_classes=options["num_classes"], image_size=options["image_size"])
    train = TrainSection(**{**options["train"], "nproc": world.size})
    trainer = Trainer(model, train, device=device, seed=options["seed"])
    out = Path(options["out"])
    results = []
    for t in range(options["experiences"]):
        data = synthetic_experience(model.num_classes, model.image_size, options["labeled"], options["unlabeled"], seed=options["seed"] + t)
        results.append(trainer.train_experience(*data, steps=options["steps"]))
    trainer.save_checkpoint(out / "checkpoint.pt")  # rank 0 only
    if options.get("every_rank"):
        save_state(out / f"rank-{world.rank}.pt", trainer.state_dict())
    if world.main:
        summary = {"nproc": world.size, "device": str(device), "experiences": results}
        (out / "result.json").write_text(json.dumps(summary, default=str, indent=1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=1, help="processes to spawn when not started by torchrun")
    parser.add_argument("--out", required=True, help="folder for checkpoint.pt and result.json (rank 0)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backbone", default="resnet10t")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--num-classes", type=int, default=4)
    parser.add_argument("--experiences", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="steps per experience")
    parser.add_argument("--labeled", type=int, default=64, help="labeled images per experience")
    parser.add_argument("--unlabeled", type=int, default=64, help="unlabeled frames per experience")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0 = torch default)")
    parser.add_argument("--every-rank", action="store_true", help="each rank writes rank-<r>.pt with its whole state")
    parser.add_argument("--train", default="{}", help='TrainSection overrides as JSON, e.g. {"augment": false, "labeled_batch": 16}')
    args = parser.parse_args(argv)
    try:
        train = json.loads(args.train)
    except json.JSONDecodeError as e:
        raise SystemExit(f"--train: not JSON: {e}") from None
    options = {**vars(args), "train": train}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if "RANK" in os.environ or args.nproc == 1:
        run_update(options)
        if dist.is_initialized():
            dist.destroy_process_group()
    else:
        spawn(run_update, args.nproc, (options,))


if __name__ == "__main__":
    main()
