"""The trainer: turns an experience (labeled images + unlabeled frames) into an updated student.

One step (``Trainer.step``) computes every loss term the configured method
uses, from two student passes (distillation, rotation) and one pass per
teacher over the distillation pass's images, and returns the terms.
``train_experience`` runs the schedule around it: class bookkeeping and teacher
snapshots at the start, steps until the epoch schedule or the time budget is
spent, the representation memory at the end.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Callable

import torch

from cl_agent import distributed, losses
from cl_agent.augment import AugmentSettings, augment, normalize, to_float
from cl_agent.checkpoint import load_state, save_state
from cl_agent.config import ModelSection, TrainSection, build
from cl_agent.device import resolve_device, to_device
from cl_agent.errors import CLAgentError
from cl_agent.memory import Memory
from cl_agent.method import LOSS_TERMS, epochs_for, get_method, loss_weights, steps_per_epoch
from cl_agent.student import ROTATIONS, SeenClassMask, create_student
from cl_agent.teacher import Teachers, gather_selected, select_teacher, teacher_outputs


class TrainingDivergedError(CLAgentError):
    """A loss became NaN or infinite; the optimizer step was not taken."""


def rotate_four_ways(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, C, H, W) -> the 4R images rotated by 0, 90, 180, 270 degrees and their rotation labels (4R,)."""
    rotated = torch.cat([torch.rot90(x, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=x.device).repeat_interleave(x.shape[0])
    return rotated, labels


def _teacher_setup(method_teachers: str, train: TrainSection) -> dict:
    """Teachers() keyword arguments for a method's teacher kind."""
    if method_teachers == "ema_and_snapshots":
        return dict(keep=train.snapshots, mode=train.snapshot_mode, source="ema", ema_is_teacher=True)
    if method_teachers == "ema":
        return dict(keep=0, mode="frozen", source="ema", ema_is_teacher=True)
    if method_teachers == "previous":
        return dict(keep=1, mode="frozen", source="student", ema_is_teacher=False)
    return dict(keep=0, mode="frozen", source="ema", ema_is_teacher=False)


class _InstanceOrClassMethod:
    """A method bound to the instance when called on one, else to the class."""

    def __init__(self, function: Callable):
        self.function = function
        functools.update_wrapper(self, function)

    def __get__(self, instance, owner):
        return functools.partial(self.function, instance if instance is not None else owner)


class StudentPasses(torch.nn.Module):
    """The student's passes of one step as one forward, so that DistributedDataParallel sees them.

    x (L + U, 3, S, S) -> features (L + U, D), logits (L, K), (U, K); x_rotated
    (4R, 3, S, S) in a pass of its own -> rotation logits (4R, 4); replayed
    memory features (M, D) -> logits (M, K). The first pass holds exactly the
    images the teachers see, so both normalise BN over the same batch. Heads with
    no rows give None (an unused head must not be in the graph under DDP).
    """

    def __init__(self, student: torch.nn.Module, features: Callable):
        super().__init__()
        self.student, self.features = student, features  # features: student.forward_features, maybe compiled

    def forward(self, x: torch.Tensor, n_l: int, x_rotated: torch.Tensor | None, replay_features: torch.Tensor | None):
        feats, head = self.features(x), self.student.forward_head
        return (
            feats,
            head(feats[:n_l]).float(),
            head(feats[n_l:]).float() if len(x) > n_l else None,
            self.student.forward_rotation(self.features(x_rotated)).float() if x_rotated is not None else None,
            head(replay_features).float() if replay_features is not None else None,
        )


class Trainer:
    """Student, teachers, memory and optimizer of one continual learner, and its schedule position.

    Under an initialised process group of ``train.nproc`` processes, every rank
    builds the same trainer and passes its shard of each global batch (see
    cl_agent/distributed.py and docs/method.md, "Distributed updates").
    """

    def __init__(self, model: ModelSection, train: TrainSection, device: torch.device | str = "cpu", seed: int = 0):
        self.world = distributed.current_world()
        if train.nproc != self.world.size:
            raise CLAgentError(
                f"train.nproc = {train.nproc} but this update runs in {self.world.size} process(es): "
                f"an update in several processes is started with torchrun "
                f"(torchrun --nproc_per_node {train.nproc} -m cl_agent.distributed ...); `cl-agent run` trains in one, set train.nproc = 1"
            )
        if self.world.active and train.labeled_batch < distributed.MIN_ROWS_PER_RANK * self.world.size:
            raise CLAgentError(
                f"train.labeled_batch = {train.labeled_batch}: with nproc = {self.world.size} it must be at least "
                f"{distributed.MIN_ROWS_PER_RANK * self.world.size} (the global batch is split across the processes)"
            )
        self.model_config, self.train_config, self.seed = model, train, seed
        self.device = distributed.rank_device(resolve_device(device, "device"), self.world)
        self.method = get_method(train.method)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the caller's RNG
            torch.manual_seed(seed)
            self.student = distributed.synchronised_batchnorm(create_student(model), self.device, self.world).to(self.device)
        self.cuda = self.device.type == "cuda"
        # not with compile: torch.compile picks its own layouts (and channels_last + compile failed in backward on torch 2.11)
        channels_last = train.channels_last and self.cuda and not train.compile
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.student.to(memory_format=self.memory_format)
        self.teachers = Teachers(
            self.student,
            decay=train.ema_decay,
            copy_classifier=train.ema_copy_classifier,
            **_teacher_setup(self.method.teachers, train),
        )
        self.memory = Memory(train.memory_size, self.student.feature_dim, model.num_classes, self.device)
        self.optimizer = torch.optim.Adam(self.student.parameters(), lr=train.lr, fused=True)  # one kernel; 6x faster on CPU
        self.generator = torch.Generator().manual_seed(seed)  # every sampling choice (the same on every rank)
        # augmentation: the same generator in one process; one per rank (reseeded per experience) in several
        self.augment_generator = torch.Generator() if self.world.active else self.generator
        self.augment_settings = AugmentSettings(
            ops=train.randaugment_ops, magnitude=train.randaugment_magnitude, crop_scale=(train.crop_scale_min, 1.0)
        )
        self.mean = torch.tensor(model.mean, device=self.device)
        self.std = torch.tensor(model.std, device=self.device)
        self.features = torch.compile(self.student.forward_features) if train.compile else self.student.forward_features
        self.passes = distributed.data_parallel(StudentPasses(self.student, self.features), self.device, self.world)
        self.hide_unseen = self.method.masked_ce  # the MLKD family scores only classes seen so far

        self.experience_index = 0  # t of the next experience to learn
        self.seen_classes: set[int] = set()
        self.previous_classes: set[int] = set()  # classes of experiences before the current one
        self.current_classes: set[int] = set()
        self.weights = loss_weights(self.method, train, 0)
        self.checkpoint_extra: dict = {}  # caller data stored with the last loaded checkpoint (e.g. label names)
        self._set_class_masks()

    # ------------------------------------------------------------------ internals

    def _class_mask(self, classes: set[int]) -> torch.Tensor:
        mask = torch.zeros(self.model_config.num_classes, dtype=torch.bool)
        mask[list(classes)] = True
        return mask.to(self.device)

    def _set_class_masks(self) -> None:
        self.seen_mask = self._class_mask(self.seen_classes)
        self.previous_mask = self._class_mask(self.previous_classes)
        self.current_mask = self._class_mask(self.current_classes)
        self.unseen_mask = ~self.seen_mask if self.hide_unseen else None

    def _autocast(self):
        if self.cuda and self.train_config.amp:
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _input(self, images: torch.Tensor, train: bool = True) -> torch.Tensor:
        """uint8 (B, H, W, 3) on the device -> normalised float (B, 3, H, W), augmented when training."""
        if train and self.train_config.augment:
            x = augment(images, self.augment_settings, self.augment_generator)
        else:
            x = to_float(images)
        return normalize(x, self.mean, self.std).contiguous(memory_format=self.memory_format)

    # ------------------------------------------------------------------ one step

    def step(self, labeled: torch.Tensor, labels: torch.Tensor, unlabeled: torch.Tensor) -> dict[str, float]:
        """One optimizer step on uint8 images already on the device; returns the unweighted terms and "total".

        The arguments are the global batch; with several processes each rank passes its shard.
        """
        mine = self.world.shard(len(labeled))
        terms, (features_l, logits_l) = self._loss_terms(labeled[mine], labels[mine], unlabeled[self.world.shard(len(unlabeled))])
        total = sum(self.weights[name] * value for name, value in terms.items())

        # backward (DDP averages the gradients), one host sync for every term (mean over ranks), then the step
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        stacked = self.world.average(torch.stack([total.detach(), *(value.detach() for value in terms.values())]))
        values = dict(zip(["total", *terms], stacked.tolist()))
        if not all(math.isfinite(v) for v in values.values()):
            raise TrainingDivergedError(
                f"non-finite loss at experience {self.experience_index}: "
                + ", ".join(f"{k}={v:.4g}" for k, v in values.items())
                + f" (method {self.method.name}, lr {self.train_config.lr}); the step was not applied"
            )
        if self.method.memory and self.train_config.memory_online:  # ER-ACE: the stream feeds the memory too
            gather = functools.partial(self.world.gather_rows, n=len(labeled))  # every rank inserts the whole batch
            self.memory.add(gather(features_l), gather(logits_l), labels, self.generator)
        self.optimizer.step()
        self.world.broadcast_buffers(self.student)  # BN statistics of rank 0 (per-shard without SyncBatchNorm)
        self.teachers.update(self.student)
        return values

    def _loss_terms(self, labeled: torch.Tensor, labels: torch.Tensor, unlabeled: torch.Tensor):
        """The forward passes and every loss term with a non-zero weight.

        Returns ({term: scalar tensor}, (labeled features, masked labeled logits) detached, for the memory).
        """
        w, teachers, cfg = self.weights, self.teachers.modules(), self.train_config
        distill_l = bool(teachers) and w["kd_feature"] > 0
        distill_u = bool(teachers) and len(unlabeled) > 0 and (w["kd_feature_unlabeled"] + w["kd_logit"] + w["lwf"]) > 0
        rotations = min(self.world.shard_sizes(cfg.rotation_images)[self.world.rank], len(unlabeled)) if w["ssl"] > 0 else 0

        # augment once: the teachers see the student's views
        x_l = self._input(labeled)  # (L, 3, S, S)
        x_u = self._input(unlabeled if distill_u else unlabeled[:rotations]) if (distill_u or rotations) else None  # (U or R, 3, S, S)
        x_r, y_r = rotate_four_ways(x_u[:rotations]) if rotations else (None, None)  # (4R, 3, S, S)
        n_l, n_u = len(x_l), (len(x_u) if distill_u else 0)
        x = torch.cat([x_l, x_u]) if n_u else x_l  # (L + U, 3, S, S): the student's distillation pass
        # the teachers see that pass whole when they normalise BN over their batch (the student's batch); else what is distilled
        n_tl = n_l if (distill_l or cfg.teacher_batch_statistics) else 0
        teaching = distill_l or n_u > 0

        # student: the distillation pass, the rotation pass, replayed memory features; teachers: one pass each, no grad
        replaying = w["memory"] and cfg.memory_batch > 0 and len(self.memory) > 0
        replay = self.memory.sample(cfg.memory_batch, self.generator) if replaying else None
        with self._autocast():
            feats, logits_l, logits_u, rot_logits, replay_logits = self.passes(x, n_l, x_r, replay[0] if replay else None)
            if teaching:
                t_feats, t_logits = teacher_outputs(teachers, x[n_l - n_tl :], cfg.teacher_batch_statistics)

        terms = {}
        hidden = losses.ace_mask(labels, self.seen_mask, self.previous_mask) if self.method.masked_ce else None
        terms["ce"] = losses.masked_cross_entropy(logits_l, labels, hidden)
        if teaching:
            t_logits = losses.apply_mask(t_logits.float(), self.unseen_mask)  # (T, L' + U, K)
        if distill_l:
            pick = select_teacher(t_logits[:, :n_tl], labels)
            teacher_f = gather_selected(t_feats[:, :n_tl], pick).float()
            terms["kd_feature"] = losses.feature_distillation(feats[:n_l].float(), teacher_f)
        if n_u:
            pick = select_teacher(t_logits[:, n_tl:])
            teacher_f, teacher_z = gather_selected(t_feats[:, n_tl:], pick).float(), gather_selected(t_logits[:, n_tl:], pick)
            student_z = losses.apply_mask(logits_u, self.unseen_mask)
            if w["kd_feature_unlabeled"]:
                terms["kd_feature_unlabeled"] = losses.feature_distillation(feats[n_l : n_l + n_u].float(), teacher_f)
            if w["kd_logit"] and cfg.kd_logit_kind == "symmetry":
                terms["kd_logit"] = losses.symmetry_distillation(student_z, teacher_z)
            elif w["kd_logit"]:
                terms["kd_logit"] = losses.kl_distillation(student_z, teacher_z, cfg.kd_temperature)
            if w["lwf"]:
                terms["lwf"] = losses.kl_distillation(student_z, teacher_z, cfg.lwf_temperature)
        if rotations:
            terms["ssl"] = losses.rotation_loss(rot_logits, y_r)
        if replay:
            replay_logits = losses.apply_mask(replay_logits, self.unseen_mask)
            terms["memory"] = losses.memory_replay(replay_logits, replay[1], replay[2])
        if w["margin"]:
            previous_only = self.previous_mask & ~self.current_mask
            terms["margin"] = losses.margin_constraint(logits_l, self.current_mask, previous_only, ~self.seen_mask, cfg.margin)
        memory_items = (feats[:n_l].detach().float(), losses.apply_mask(logits_l.detach(), self.unseen_mask))
        return terms, memory_items

    # ------------------------------------------------------------------ an experience

    def _check_images(self, name: str, images: torch.Tensor, allow_empty: bool) -> torch.Tensor:
        images = torch.as_tensor(images)
        s = self.model_config.image_size
        if allow_empty and images.numel() == 0:
            return torch.zeros(0, s, s, 3, dtype=torch.uint8)
        if images.dtype != torch.uint8 or images.ndim != 4 or tuple(images.shape[1:]) != (s, s, 3):
            raise CLAgentError(
                f"{name}: expected uint8 (N, {s}, {s}, 3) images (model.image_size = {s}), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        return images

    def begin_experience(self, labels: torch.Tensor) -> None:
        """Class bookkeeping, weights for t, teacher snapshots and EMA re-copy."""
        t = self.experience_index
        self.previous_classes = set(self.seen_classes)
        self.current_classes = set(labels.unique().tolist())
        self.seen_classes |= self.current_classes
        self._set_class_masks()
        self.weights = loss_weights(self.method, self.train_config, t)
        self.teachers.start_experience(self.student, t)
        if self.world.active:  # each rank augments its own shard: its own draws, reproducible per experience
            self.augment_generator.manual_seed(distributed.rank_seed(self.seed, self.world.rank, t))

    @torch.no_grad()
    def end_experience(self, labeled: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> None:
        """Store (feature, logits, label) of the labeled data in the memory; advance t."""
        if self.method.memory and self.memory.capacity > 0:
            self.student.eval()
            order = torch.randperm(len(labeled), generator=self.generator).to(labeled.device)
            for chunk in order.split(batch_size):
                mine, gather = chunk[self.world.shard(len(chunk))], functools.partial(self.world.gather_rows, n=len(chunk))
                with self._autocast():
                    feats = self.student.forward_features(self._input(labeled[mine], train=False))
                    logits = self.student.forward_head(feats)
                logits = losses.apply_mask(logits.float(), self.unseen_mask)
                self.memory.add(gather(feats.float()), gather(logits), labels[chunk], self.generator)
            self.student.train()
        self.experience_index += 1

    def train_experience(
        self,
        labeled_images: torch.Tensor,
        labels: torch.Tensor,
        unlabeled_images: torch.Tensor,
        *,
        steps: int | None = None,
        time_budget_s: float | None = None,
        progress: Callable[[dict], None] | None = None,
    ) -> dict:
        """Learn one experience. Images uint8 (N, S, S, 3) at model.image_size; labels int64 (N,).

        steps overrides the epoch schedule; time_budget_s (default train.time_budget_s,
        0 = none) stops the update cleanly after the step that spends it. Returns
        mean loss terms ("loss", "loss_<term>"), steps, seconds, stopped_by_budget.
        """
        labeled = self._check_images("labeled_images", labeled_images, allow_empty=False)
        unlabeled = self._check_images("unlabeled_images", unlabeled_images, allow_empty=True)
        labels = torch.as_tensor(labels)
        k = self.model_config.num_classes
        if len(labeled) < 2:
            raise CLAgentError(f"labeled_images: an experience needs at least 2 labeled images, got {len(labeled)}")
        if labels.shape != (len(labeled),) or labels.dtype != torch.int64:
            raise CLAgentError(f"labels: expected int64 ({len(labeled)},), got {labels.dtype} {tuple(labels.shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise CLAgentError(f"labels: values must be in [0, {k}) (model.num_classes), got {labels.min()}..{labels.max()}")
        if steps is not None and steps < 1:
            raise CLAgentError(f"steps = {steps}: must be >= 1")
        budget = self.train_config.time_budget_s if time_budget_s is None else time_budget_s

        t = self.experience_index
        labeled, labels, unlabeled = labeled.to(self.device), labels.to(self.device), unlabeled.to(self.device)
        self.begin_experience(labels)
        batch = self.train_config.labeled_batch
        epochs = epochs_for(self.train_config, t)
        planned = steps if steps is not None else epochs * steps_per_epoch(len(labeled), batch)
        sums = dict.fromkeys(["total", *LOSS_TERMS], 0.0)
        counts = dict.fromkeys(sums, 0)
        order, position, done, stopped = torch.empty(0, dtype=torch.long), 0, 0, False
        self.student.train()
        start = time.perf_counter()
        for _ in range(planned):
            if position >= len(order):  # a new epoch over the labeled data
                order, position = to_device(torch.randperm(len(labeled), generator=self.generator), self.device), 0
            end = position + batch + (1 if len(order) - (position + batch) == 1 else 0)  # no 1-image batch (BN)
            index = order[position:end]
            position = end
            pick = torch.randperm(len(unlabeled), generator=self.generator)[: self.train_config.unlabeled_batch]
            values = self.step(labeled[index], labels[index], unlabeled[to_device(pick, self.device)])
            done += 1
            for name, value in values.items():
                sums[name] += value
                counts[name] += 1
            elapsed = time.perf_counter() - start
            if progress is not None:
                progress({"experience": t, "step": done, "steps": planned, "elapsed_s": elapsed, **values})
            if budget and self.world.any(elapsed >= budget) and done < planned:  # every rank stops at the same step
                stopped = True
                break
        train_seconds = time.perf_counter() - start
        self.end_experience(labeled, labels)
        return {
            "experience": t,
            "method": self.method.name,
            "steps": done,
            "planned_steps": planned,
            "epochs": epochs if steps is None else None,
            "seconds": train_seconds,
            "stopped_by_budget": stopped,
            "loss": sums["total"] / max(counts["total"], 1),
            **{f"loss_{name}": sums[name] / counts[name] for name in LOSS_TERMS if counts[name]},
            "weights": dict(self.weights),
            "seen_classes": len(self.seen_classes),
            "memory_items": len(self.memory),
        }

    # ------------------------------------------------------------------ inference

    def inference_modules(self) -> list[torch.nn.Module]:
        """CPU copies in eval mode mapping normalised float NCHW -> logits; unseen classes get -1e4.

        [student, ema] when model.ensemble_ema, else [student].
        """
        networks = [self.student] + ([self.teachers.ema] if self.model_config.ensemble_ema else [])
        seen = self.seen_mask.cpu()
        modules = []
        for network in networks:
            clone = distributed.plain_batchnorm(copy.deepcopy(network)).cpu().to(memory_format=torch.contiguous_format)
            modules.append(SeenClassMask(clone, seen).eval().requires_grad_(False))
        return modules

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> float32 logits (N, num_classes) on the CPU, in eval mode, float32."""
        images = self._check_images("images", images, allow_empty=True)
        networks = [self.student] + ([self.teachers.ema] if self.model_config.ensemble_ema else [])
        masked = [SeenClassMask(network, self.seen_mask) for network in networks]
        self.student.eval()
        outputs = []
        for chunk in images.split(batch_size):
            x = self._input(chunk.to(self.device), train=False)
            outputs.append(torch.stack([m(x).float() for m in masked]).mean(0).cpu())
        self.student.train()
        return torch.cat(outputs) if outputs else torch.zeros(0, self.model_config.num_classes)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {
            "model": dataclasses.asdict(self.model_config),
            "train": dataclasses.asdict(self.train_config),
            "seed": self.seed,
            "experience_index": self.experience_index,
            "seen_classes": sorted(self.seen_classes),
            "previous_classes": sorted(self.previous_classes),
            "current_classes": sorted(self.current_classes),
            "weights": dict(self.weights),
            "student": self.student.state_dict(),
            "teachers": self.teachers.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "memory": self.memory.state_dict(),
            "rng": {
                "generator": self.generator.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if self.cuda else [],
            },
        }

    def load_state_dict(self, state: dict) -> None:
        self.experience_index = int(state["experience_index"])
        self.seen_classes = set(state["seen_classes"])
        self.previous_classes = set(state["previous_classes"])
        self.current_classes = set(state["current_classes"])
        self._set_class_masks()
        self.weights = dict(state["weights"])
        self.student.load_state_dict(state["student"])
        self.teachers.load_state_dict(state["teachers"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.memory.load_state_dict(state["memory"])
        self.generator.set_state(state["rng"]["generator"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.cuda and state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write everything needed to continue (atomic). ``extra``: plain data of the caller, e.g. label names.

        With several processes only rank 0 writes (the state is the same on every rank); the others return the path.
        """
        if not self.world.main:
            return Path(path)
        return save_state(path, {**self.state_dict(), "extra": dict(extra or {})})

    def _load_checkpoint(self_or_class, path: str | Path, device: torch.device | str = "cpu", train: TrainSection | None = None):
        """Restore a ``save_checkpoint`` file.

        On an instance (``trainer.load_checkpoint(path)``): restores in place,
        keeping this trainer's train section and device, and returns it; the model
        section must match. On the class (``Trainer.load_checkpoint(path, device,
        train)``): builds a new trainer from the stored sections (``train``
        replaces the stored one, e.g. for a new budget; without it the stored one
        is used with ``nproc`` set to the processes running now, so an update made
        in several processes loads in one and vice versa).
        """
        state = load_state(path)
        stored_model = _section(ModelSection, state["model"], path)
        if isinstance(self_or_class, Trainer):
            trainer = self_or_class
            _check_same_model(stored_model, trainer.model_config, path)
        else:
            stored_train = train or dataclasses.replace(
                _section(TrainSection, state["train"], path), nproc=distributed.current_world().size
            )
            trainer = self_or_class(stored_model, stored_train, device, seed=int(state["seed"]))
        trainer.load_state_dict(state)
        trainer.checkpoint_extra = state.get("extra", {})
        return trainer

    load_checkpoint = _InstanceOrClassMethod(_load_checkpoint)


def check_checkpoint_model(path: str | Path, model: ModelSection) -> None:
    """Refuse the checkpoint at ``path`` (CLAgentError, naming what differs) unless it was trained with
    ``model``, the config's model section; reads only the stored section (the file is mapped, not loaded).

    The start check of ``load_checkpoint`` on a trainer, run without building one (the agent runs it
    before it opens ingestion)."""
    state = load_state(path, mmap=True)
    if not isinstance(state.get("model"), dict):
        raise CLAgentError(f"checkpoint {str(path)!r} holds no model section")
    try:
        stored = _section(ModelSection, state["model"], path)
    except ValueError as e:  # ConfigError: a stored value this version refuses
        raise CLAgentError(str(e)) from None
    _check_same_model(stored, model, path)


def _check_same_model(stored: ModelSection, configured: ModelSection, path) -> None:
    if stored == configured:
        return
    changed = "; ".join(
        f"model.{f.name}: {getattr(stored, f.name)!r} there, {getattr(configured, f.name)!r} in the config"
        for f in dataclasses.fields(ModelSection)
        if getattr(stored, f.name) != getattr(configured, f.name)
    )
    raise CLAgentError(
        f"checkpoint {str(path)!r} was trained with another model ({changed}). Set the config back; "
        "or, for a new model, give it a new agent.workdir and agent.model_name (a new model learns from scratch)"
    )


def _section(section: type, data: dict, path) -> object:
    """Build a config section from stored values, ignoring keys this version no longer has."""
    known = {f.name for f in dataclasses.fields(section)}
    return build(section, {k: v for k, v in data.items() if k in known}, source=f"checkpoint {path}")
