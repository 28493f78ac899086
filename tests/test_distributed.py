"""A 2-process gloo update on the CPU against the same update in one process.

Two runs per process count, same seed and global batches:

- "mirrored": each global batch is a half batch written twice, so each rank's
  shard holds exactly the images of the other rank. BatchNorm statistics of a
  shard then equal those of the global batch, and the sharded update is the
  single-process update up to float summation order (t = 0, augmentation and
  rotations off; rotation SSL would rotate a different subset of the unlabeled
  frames per shard). Checked after 3 steps: the loss of every step to 1e-5
  relative; the difference of all weights to the single-process ones is below
  5% (L2) of the update itself, and fewer than 1% of the weights differ by more
  than a tenth of an Adam step (lr 1e-3). Exact equality cannot hold: where a
  gradient is near zero, Adam's normalisation turns rounding noise into up to a
  full step. BN running variances are left out: each rank's Bessel correction
  uses its shard's size.
- "stream": two experiences through ``train_experience``. With real batches
  each rank normalises BN with its own shard's statistics (PyTorch's
  SyncBatchNorm runs on GPUs only), so the student cannot equal the
  single-process one. What must hold and is checked: the data order and the
  memory are the single-process ones, the students predict alike, and every
  rank holds bitwise the same student, optimizer, teachers and memory.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cl_agent import distributed
from cl_agent.checkpoint import load_state, save_state
from cl_agent.errors import CLAgentError
from cl_agent.trainer import Trainer
from learning_stream import make_images, make_stream, tiny_model, tiny_train

MIRRORED_RELATIVE_L2 = 0.05  # |w_sharded - w_single| / |w_single - w_initial| over all weights (observed 0.011)
MIRRORED_FAR_FRACTION = 0.01  # weights differing by more than 1e-4 (observed 0.0005)


def _stream():
    return make_stream(num_experiences=2, classes_per_experience=2, per_class=16, unlabeled=24, seed=0)


def _mirrored(nproc: int) -> dict:
    (experiences, _) = _stream()
    x, y, u = experiences[0]
    trainer = Trainer(tiny_model(4), tiny_train(augment=False, rotation_images=0, nproc=nproc), seed=0)
    trainer.begin_experience(y)
    initial = {name: value.clone() for name, value in trainer.student.state_dict().items()}
    losses = []
    for i in range(3):
        half, frames = slice(8 * i, 8 * i + 8), slice(8 * i, 8 * i + 8)
        losses.append(trainer.step(x[half].repeat(2, 1, 1, 1), y[half].repeat(2), u[frames].repeat(2, 1, 1, 1))["total"])
    return {"losses": losses, "initial": initial, "student": trainer.student.state_dict(), "memory": trainer.memory.state_dict()}


def _streamed(nproc: int, checkpoint: str | None = None) -> dict:
    (experiences, templates) = _stream()
    trainer = Trainer(tiny_model(4), tiny_train(augment=False, nproc=nproc), seed=0)
    results = [trainer.train_experience(*experience, steps=8) for experience in experiences]
    if checkpoint is not None:
        trainer.save_checkpoint(checkpoint)
    held_out = torch.arange(4).repeat_interleave(16)
    state = trainer.state_dict()
    del state["rng"]["torch"]  # the process-global RNG is not the trainer's (it draws from its own generators)
    return {
        "state": state,
        "losses": [r["loss"] for r in results],
        "predictions": trainer.predict(make_images(templates, held_out, torch.Generator().manual_seed(7))).argmax(1),
    }


def _budget(nproc: int) -> dict:
    (experiences, _) = _stream()
    trainer = Trainer(tiny_model(4), tiny_train("naive", nproc=nproc), seed=0)
    result = trainer.train_experience(*experiences[0], steps=1000, time_budget_s=0.3)
    return {"steps": result["steps"], "stopped_by_budget": result["stopped_by_budget"], "memory": trainer.memory.state_dict()}


def _both(nproc: int, checkpoint: str | None = None) -> dict:
    return {"mirrored": _mirrored(nproc), "stream": _streamed(nproc, checkpoint), "budget": _budget(nproc)}


def _rank(out: str) -> None:
    torch.set_num_threads(1)
    world, _ = distributed.init_from_env("cpu")
    save_state(f"{out}/rank-{world.rank}.pt", _both(world.size, checkpoint=f"{out}/checkpoint-{world.rank}.pt"))


def _leaves(value, prefix=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _leaves(item, f"{prefix}/{key}")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{prefix}/{i}")
    else:
        yield prefix, value


def _same(a, b) -> list[str]:
    """Paths of the leaves that differ (tensors bitwise)."""
    left, right = dict(_leaves(a)), dict(_leaves(b))
    assert left.keys() == right.keys()
    return [k for k, v in left.items() if not (torch.equal(v, right[k]) if torch.is_tensor(v) else v == right[k])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    distributed.spawn(_rank, 2, (str(out),))
    return _both(1), [load_state(out / f"rank-{r}.pt") for r in range(2)], out


def test_mirrored_batches_give_the_single_process_update(runs):
    single, ranks, _ = runs
    for rank in ranks:
        sharded = rank["mirrored"]
        reference, initial = single["mirrored"]["student"], single["mirrored"]["initial"]
        weights = [name for name, value in reference.items() if value.is_floating_point() and "running" not in name]
        difference = torch.cat([(sharded["student"][name] - reference[name]).flatten() for name in weights])
        update = torch.cat([(reference[name] - initial[name]).flatten() for name in weights])
        assert difference.norm() < MIRRORED_RELATIVE_L2 * update.norm()
        assert (difference.abs() > 1e-4).float().mean() < MIRRORED_FAR_FRACTION
        for name in reference:
            if name.endswith("running_mean"):  # follows the weights, so held to the same relative bound
                moved = (reference[name] - initial[name]).norm()
                assert (sharded["student"][name] - reference[name]).norm() < MIRRORED_RELATIVE_L2 * moved, name
            elif not reference[name].is_floating_point():
                assert torch.equal(sharded["student"][name], reference[name]), name  # num_batches_tracked
        assert sharded["losses"] == pytest.approx(single["mirrored"]["losses"], rel=1e-5)
        assert torch.equal(sharded["memory"]["labels"], single["mirrored"]["memory"]["labels"])
        assert torch.allclose(sharded["memory"]["features"], single["mirrored"]["memory"]["features"], atol=1e-3)


def test_every_rank_holds_the_same_student_teachers_and_memory(runs):
    _, (rank0, rank1), _ = runs
    assert _same(rank0, rank1) == []  # student, optimizer, EMA, snapshots, memory, generator, losses, predictions
    assert rank0["budget"]["stopped_by_budget"]  # the ranks agreed on the step that spent the time budget
    state = rank0["stream"]["state"]
    assert len(state["teachers"]["snapshots"]) == 1 and state["memory"]["labels"].numel() > 0


def test_sharded_stream_update_is_the_same_method(runs):
    single, (rank0, _), _ = runs
    sharded, reference = rank0["stream"], single["stream"]
    # the same data order and memory choices: the memory holds the same items in the same slots
    assert torch.equal(sharded["state"]["memory"]["labels"], reference["state"]["memory"]["labels"])
    assert torch.equal(sharded["state"]["rng"]["generator"], reference["state"]["rng"]["generator"])
    # per-shard BN statistics change the numbers, not the outcome
    assert all(math.isfinite(v) for v in sharded["losses"])
    assert sharded["losses"] == pytest.approx(reference["losses"], rel=0.25)
    agreement = (sharded["predictions"] == reference["predictions"]).float().mean().item()
    assert agreement >= 0.85, agreement  # observed 0.95


def test_only_rank_0_writes_a_checkpoint_that_loads_in_one_process(runs):
    _, (rank0, _), out = runs
    assert (out / "checkpoint-0.pt").is_file() and not (out / "checkpoint-1.pt").exists()
    trainer = Trainer.load_checkpoint(out / "checkpoint-0.pt")  # stored nproc = 2, loaded in one process
    assert trainer.train_config.nproc == 1
    (_, templates) = _stream()
    held_out = torch.arange(4).repeat_interleave(16)
    predictions = trainer.predict(make_images(templates, held_out, torch.Generator().manual_seed(7))).argmax(1)
    assert torch.equal(predictions, rank0["stream"]["predictions"])


def test_shards_split_a_global_batch_and_gather_in_rank_order():
    worlds = [distributed.World(rank, 3) for rank in range(3)]
    assert [w.shard(10) for w in worlds] == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert [w.shard(5) for w in worlds] == [slice(0, 5)] * 3  # too small to give every rank 2 rows: not split
    single = distributed.World()
    assert single.shard(7) == slice(0, 7) and single.shard_sizes(1) == [1]
    rows = torch.arange(6.0).view(3, 2)
    assert single.gather_rows(rows, 3) is rows and torch.equal(single.average(rows), rows)


def test_module_entry_runs_one_update_in_one_process(tmp_path):
    distributed.main([
        "--out", str(tmp_path), "--image-size", "16", "--steps", "2", "--labeled", "8", "--unlabeled", "8",
        "--train", '{"labeled_batch": 4, "unlabeled_batch": 4, "rotation_images": 2, "augment": false}',
    ])  # fmt: skip
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["nproc"] == 1 and result["experiences"][0]["steps"] == 2
    assert Trainer.load_checkpoint(tmp_path / "checkpoint.pt").experience_index == 1


def test_the_agent_refuses_several_processes():
    distributed.check_agent_nproc(1)
    with pytest.raises(CLAgentError, match=r"train.nproc = 2.*torchrun --nproc_per_node 2"):
        distributed.check_agent_nproc(2)
