"""The CUDA paths, each test run on the CPU too so its logic is proven where no GPU is present.

The cuda variants carry the ``gpu`` marker and are skipped without a CUDA device. Results made on
the device are always brought to the CPU and compared there; where bf16 autocast applies (training
with train.amp on CUDA) the tests compare finiteness and top-1 agreement, not exact values.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cl_agent import losses
from cl_agent.augment import AugmentSettings, augment
from cl_agent.checkpoint import load_state
from cl_agent.export import export_onnx
from cl_agent.config import ExportSection
from cl_agent.trainer import Trainer
from learning_stream import make_stream, real_images, tiny_model, tiny_train

REPO = Path(__file__).resolve().parents[1]
CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


@pytest.fixture(scope="module")
def stream():
    return make_stream(num_experiences=2, classes_per_experience=2, per_class=16, unlabeled=16, seed=0)


def cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def changed(before: dict, after: dict) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before)


def trained_trainer(device: str, experiences) -> tuple[Trainer, dict, dict]:
    """A trainer with the default train.amp and train.channels_last, after two steps of experience 0."""
    train = tiny_train()
    assert train.amp and train.channels_last  # the defaults this file is about
    trainer = Trainer(tiny_model(4), train, device=device)
    before = cpu_state(trainer.student)
    result = trainer.train_experience(*experiences[0], steps=2)
    return trainer, before, result


@pytest.mark.parametrize("device", DEVICES)
def test_an_update_on_the_device_learns_and_exports_a_matching_onnx(device, stream, tmp_path):
    experiences, _ = stream
    trainer, before, result = trained_trainer(device, experiences)
    terms = {k: v for k, v in result.items() if k.startswith("loss_")}
    assert terms and all(np.isfinite(v) for v in terms.values()), terms
    assert changed(before, cpu_state(trainer.student))
    assert {p.device.type for p in trainer.student.parameters()} == {device}
    assert trainer.memory_format == (torch.channels_last if device == "cuda" else torch.contiguous_format)

    images = real_images(8, 16)
    stats = export_onnx(
        trainer.inference_modules(), tmp_path / "m.onnx", image_size=16, mean=trainer.model_config.mean,
        std=trainer.model_config.std, export=ExportSection(), real_images=images,
    )  # fmt: skip
    assert stats["top1_mismatches"] == 0 and stats["max_abs_diff_probs"] <= ExportSection().parity_atol
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    _, probs = session.run(None, {"images": images})
    torch_logits = trainer.predict(torch.from_numpy(images))  # on the device, fp32, returned on the CPU
    assert torch_logits.device.type == "cpu"
    top2 = torch_logits.softmax(1).topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3  # a near tie may flip between two backends
    assert clear.any()
    np.testing.assert_array_equal(probs.argmax(1)[clear.numpy()], torch_logits.argmax(1)[clear].numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_made_on_the_device_continues_on_the_cpu(device, stream, tmp_path):
    experiences, _ = stream
    trainer, _, _ = trained_trainer(device, experiences)
    path = trainer.save_checkpoint(tmp_path / "ckpt.pt", extra={"class_names": ["a", "b", "c", "d"]})
    state = load_state(path)  # torch.load(weights_only=True, map_location="cpu")
    assert all(v.device.type == "cpu" for v in state["student"].values())

    moved = Trainer.load_checkpoint(path, "cpu")
    assert moved.device.type == "cpu" and moved.experience_index == 1 and moved.seen_classes == {0, 1}
    assert moved.checkpoint_extra == {"class_names": ["a", "b", "c", "d"]}
    saved = cpu_state(trainer.student)
    loaded = cpu_state(moved.student)
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert {p.device.type for p in moved.student.parameters()} == {"cpu"}

    before = cpu_state(moved.student)
    result = moved.train_experience(*experiences[1], steps=1)
    assert result["experience"] == 1 and moved.experience_index == 2
    assert all(np.isfinite(v) for k, v in result.items() if k.startswith("loss_"))
    assert changed(before, cpu_state(moved.student))
    assert moved.seen_classes == {0, 1, 2, 3}


def loss_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    b, k, d = 12, 6, 16
    return {
        "logits": 3 * torch.randn(b, k, generator=gen),
        "teacher_logits": 3 * torch.randn(b, k, generator=gen),
        "stored_logits": 3 * torch.randn(b, k, generator=gen),
        "labels": torch.randint(0, 4, (b,), generator=gen),
        "features": torch.randn(b, d, generator=gen),
        "teacher_features": torch.randn(b, d, generator=gen),
        "rotation_logits": torch.randn(b, 4, generator=gen),
        "rotation_labels": torch.randint(0, 4, (b,), generator=gen),
        "seen": torch.tensor([True, True, True, True, False, False]),
        "previous": torch.tensor([True, True, False, False, False, False]),
        "current": torch.tensor([False, False, True, True, False, False]),
        "unseen": torch.tensor([False, False, False, False, True, True]),
    }


def all_losses(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    hidden = losses.ace_mask(t["labels"], t["seen"], t["previous"])
    return {
        "ace_mask": hidden,
        "masked_cross_entropy": losses.masked_cross_entropy(t["logits"], t["labels"], hidden),
        "feature_distillation": losses.feature_distillation(t["features"], t["teacher_features"]),
        "symmetry_distillation": losses.symmetry_distillation(t["logits"], t["teacher_logits"]),
        "kl_distillation": losses.kl_distillation(t["logits"], t["teacher_logits"], 2.0),
        "rotation_loss": losses.rotation_loss(t["rotation_logits"], t["rotation_labels"]),
        "memory_replay": losses.memory_replay(t["logits"], t["labels"], t["stored_logits"]),
        "margin_constraint": losses.margin_constraint(t["logits"], t["current"], t["previous"], t["unseen"], 0.5),
    }


@pytest.mark.parametrize("device", DEVICES)
def test_the_loss_functions_give_the_cpu_values_on_the_device(device, monkeypatch):
    if device == "cuda":  # full fp32 matmuls, as on the CPU
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    inputs = loss_inputs(torch.Generator().manual_seed(0))
    expected = all_losses(inputs)
    got = all_losses({k: v.to(device) for k, v in inputs.items()})
    assert expected.keys() == got.keys()
    for name, value in got.items():
        assert value.device.type == device, name
        if value.dtype == torch.bool:
            assert torch.equal(value.cpu(), expected[name]), name
        else:
            assert value.dtype == torch.float32 and torch.isfinite(value).all(), name
            torch.testing.assert_close(value.cpu(), expected[name], rtol=1e-5, atol=1e-5, msg=name)
    assert expected["margin_constraint"] > 0 and expected["symmetry_distillation"] > 0  # not trivially zero


@pytest.mark.parametrize("device", DEVICES)
def test_batched_augmentation_on_the_device_is_valid_and_seeded(device):
    images = torch.from_numpy(real_images(6, 16)).to(device)
    settings = AugmentSettings()
    first = augment(images, settings, torch.Generator().manual_seed(7))
    again = augment(images, settings, torch.Generator().manual_seed(7))
    other = augment(images, settings, torch.Generator().manual_seed(8))
    assert first.shape == (6, 3, 16, 16) and first.dtype == torch.float32 and first.device.type == device
    assert torch.isfinite(first).all() and first.min() >= 0.0 and first.max() <= 1.0
    torch.testing.assert_close(first.cpu(), again.cpu(), rtol=0, atol=0)  # the same seed, the same images
    assert not torch.equal(first.cpu(), other.cpu())
    assert augment(images[:0], settings, torch.Generator().manual_seed(7)).shape == (0, 3, 16, 16)


@pytest.mark.parametrize("device", DEVICES)
def test_bench_train_reports_positive_step_times_for_the_device(device):
    command = [
        sys.executable, str(REPO / "tools" / "bench_train.py"), "--json", "--device", device, "--backbone", "resnet10t",
        "--image-size", "16", "--repeats", "1", "--warmup", "0", "--threads", "1",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("naive_step_s", "mlkd_ssl_step_s", "floor_step_s", "student_fwd_bwd_per_image_s", "forward_per_image_s"):
        assert result[key] > 0, (key, result[key])
    assert result["amp_bf16"] is result["channels_last"] is (device == "cuda")
    if device == "cuda":
        assert result["device"] == torch.cuda.get_device_name(0)
    else:
        assert result["device"].startswith("cpu (")


@pytest.mark.parametrize("device", DEVICES)
def test_the_agent_learns_on_the_device_and_serves_the_new_version(device, tmp_path):
    from agent_harness import AgentProcess, send_experience, tiny_agent_config, wait_for_version, wait_served
    from cl_agent.client import LabeledClient
    from cl_agent.inference import InferenceClient
    from cl_agent.status import read_experience_records

    cfg, path = tiny_agent_config(tmp_path, **{"agent.device": device})
    assert cfg.agent.device == device
    agent = AgentProcess(path, tmp_path / "agent.log")
    labeled = LabeledClient(cfg.ingest.labeled_endpoint, "gpu-test", timeout_s=5.0, retries=10)
    try:
        assert send_experience(labeled, [0, 1], 16, np.random.default_rng(0)) == 32
        assert wait_for_version(cfg, 1, 180, agent) == 1
        inference = InferenceClient(cfg.serve.endpoint, timeout_s=5.0, retries=10)
        try:
            wait_served(inference, 1)
            answer = inference.predict(np.zeros((2, 16, 16, 3), np.uint8))
            assert answer.model_version == 1 and len(answer.labels) == 2
        finally:
            inference.close()
        assert agent.terminate(cfg.agent.grace_period_s + 10) == 0
    finally:
        labeled.close()
        if agent.alive():
            agent.kill9()
    (record,) = read_experience_records(cfg.agent.workdir)
    assert record["labeled"] == 32 and record["version"] == 1


@pytest.mark.parametrize("device", DEVICES)
def test_host_to_device_copies_arrive_whole_and_the_memory_replays_what_it_stored(device):
    from cl_agent.device import to_device
    from cl_agent.memory import Memory

    values = torch.arange(10_000, dtype=torch.float32)
    copies = [to_device(values * k, torch.device(device)) for k in range(3)]  # sources freed at once
    for k, copy in enumerate(copies):
        assert copy.device.type == device and torch.equal(copy.cpu(), values * k)

    memory = Memory(capacity=8, feature_dim=4, num_classes=5, device=device)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, 40, 10):
        labels = torch.arange(start, start + 10) % 5
        features = labels.float().unsqueeze(1).expand(10, 4).contiguous().to(device)
        memory.add(features, torch.nn.functional.one_hot(labels, 5).float().to(device), labels.to(device), gen)
    features, labels, logits = memory.sample(8, gen)
    assert features.device.type == device and len(labels) == 8
    assert torch.equal(features[:, 0].cpu(), labels.float().cpu())  # every row kept its own item's values
    assert torch.equal(logits.argmax(1).cpu(), labels.cpu())
    assert sorted(memory.class_counts().values()) == [1, 1, 2, 2, 2]  # class-balanced


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_compiled_student_trains_on_cuda_in_the_contiguous_layout():
    (experiences, _) = make_stream(num_experiences=1, classes_per_experience=2, per_class=8, unlabeled=16, seed=0)
    trainer = Trainer(tiny_model(2), tiny_train(compile=True), device="cuda", seed=0)
    assert trainer.memory_format == torch.contiguous_format  # channels_last is left to torch.compile
    result = trainer.train_experience(*experiences[0], steps=2)
    assert np.isfinite(result["loss"]) and result["steps"] == 2
