"""ONNX export: the graph takes uint8 NHWC, matches torch, and a broken export is refused."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from cl_agent.config import ExportSection
from cl_agent.errors import CLAgentError
from cl_agent.export import ExportError, ServingGraph, export_onnx
from learning_stream import real_images

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def tiny_net(num_classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    ).eval()


class ExportsSomethingElse(nn.Module):
    """Computes one function in torch and exports another: the parity check must catch it."""

    def __init__(self):
        super().__init__()
        self.net = tiny_net()

    def forward(self, x):
        logits = self.net(x)
        if torch.compiler.is_exporting():
            return logits.flip(-1) * 3.0
        return logits


class FlipsANearTie(nn.Module):
    """Two classes 1e-5 apart in probability; the export nudges the order: within parity_atol, top-1 changed."""

    def forward(self, x):
        base = x.mean(dim=(1, 2, 3)).unsqueeze(1) * 0.0  # (B, 1) zeros that depend on the input
        logits = base + torch.tensor([0.0, 2e-5])
        if torch.compiler.is_exporting():
            logits = logits + torch.tensor([4e-5, 0.0])
        return logits


def test_tiny_net_export_matches_torch_with_dynamic_batch(tmp_path):
    net = tiny_net()
    path = tmp_path / "m.onnx"
    stats = export_onnx([net], path, image_size=16, mean=MEAN, std=STD, export=ExportSection(), real_images=real_images(8, 16))
    assert stats["max_abs_diff_probs"] <= 1e-4 and stats["top1_mismatches"] == 0
    assert stats["samples"] == 16 + 8

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [16, 16, 3]
    assert [o.name for o in session.get_outputs()] == ["logits", "probs"]
    graph = ServingGraph([net], MEAN, STD).eval()
    for n in (1, 7):
        images = np.random.default_rng(n).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
        logits, probs = session.run(None, {"images": images})
        # Reference: normalise by hand, as the trainer does, and run the plain module.
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
        with torch.no_grad():
            expected = net(x).numpy()
            _, graph_probs = graph(torch.from_numpy(images))
        assert logits.shape == (n, 5)
        np.testing.assert_allclose(logits, expected, atol=1e-4)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
        np.testing.assert_allclose(probs, graph_probs.numpy(), atol=1e-5)


def test_ensemble_averages_logits_in_the_graph(tmp_path):
    a, b = tiny_net(seed=1), tiny_net(seed=2)
    path = tmp_path / "ens.onnx"
    export_onnx([a, b], path, image_size=16, mean=MEAN, std=STD, export=ExportSection())
    images = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    logits, _ = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"images": images})
    with torch.no_grad():
        la, _ = ServingGraph([a], MEAN, STD)(torch.from_numpy(images))
        lb, _ = ServingGraph([b], MEAN, STD)(torch.from_numpy(images))
    np.testing.assert_allclose(logits, ((la + lb) / 2).numpy(), atol=1e-5)


def test_resnet18_student_at_32px_passes_parity(tmp_path):
    from cl_agent.config import ModelSection
    from cl_agent.student import create_student

    net = create_student(ModelSection(backbone="resnet18", num_classes=10, image_size=32)).eval()
    stats = export_onnx(
        [net], tmp_path / "r18.onnx", image_size=32, mean=MEAN, std=STD, export=ExportSection(), real_images=real_images(4, 32)
    )
    assert stats["max_abs_diff_probs"] <= 1e-4 and stats["top1_mismatches"] == 0
    assert stats["cropped_weights"] > 0.5 * sum(p.numel() for p in net.parameters())  # the 1x1 maps of the last stage
    assert (tmp_path / "r18.onnx").stat().st_size < 0.5 * 4 * sum(p.numel() for p in net.parameters())
    assert net.backbone.layer4[1].conv2.kernel_size == (3, 3)  # the caller's model is untouched


def test_cropping_can_be_turned_off(tmp_path):
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4, 3)).eval()  # runs on 1x1 images
    on = export_onnx([net], tmp_path / "on.onnx", image_size=1, mean=MEAN, std=STD, export=ExportSection())
    off = export_onnx([net], tmp_path / "off.onnx", image_size=1, mean=MEAN, std=STD, export=ExportSection(crop_padding_taps=False))
    assert (on["cropped_weights"], off["cropped_weights"]) == (4 * 3 * 8, 0)
    assert (tmp_path / "on.onnx").stat().st_size < (tmp_path / "off.onnx").stat().st_size


def test_parity_is_checked_against_the_uncropped_model(tmp_path, monkeypatch):
    import cl_agent.export as export_module

    def crops_wrongly(module, example):  # a cut that changes the answers must not be published
        conv = module[0]
        conv.weight = nn.Parameter(conv.weight.detach()[:, :, :1, :1].contiguous())
        conv.kernel_size, conv.padding = (1, 1), (0, 0)
        return 1

    monkeypatch.setattr(export_module, "crop_padding_taps", crops_wrongly)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten(), nn.Linear(4, 3)).eval()
    with torch.no_grad():
        net[2].weight.mul_(50)  # large logits: a wrong cut moves the probabilities well past parity_atol
    with pytest.raises(ExportError, match="parity check failed"):
        export_onnx([net], tmp_path / "m.onnx", image_size=1, mean=MEAN, std=STD, export=ExportSection())
    assert not (tmp_path / "m.onnx").exists()


def test_export_saves_the_optimised_graph_it_checked(tmp_path):
    net = tiny_net(seed=3)
    path, optimized = tmp_path / "m.onnx", tmp_path / "m.optimized.onnx"
    export_onnx([net], path, image_size=16, mean=MEAN, std=STD, export=ExportSection(), optimized_path=optimized)
    assert optimized.is_file()
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # how a server opens it
    ready = ort.InferenceSession(str(optimized), options, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(5).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_allclose(ready.run(["probs"], {"images": images})[0], plain.run(["probs"], {"images": images})[0], atol=1e-6)


def test_optimised_graph_keeps_its_weights_in_a_file_beside_it(tmp_path):
    torch.manual_seed(4)
    net = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5)).eval()
    path, optimized = tmp_path / "m.onnx", tmp_path / "opt" / "m.optimized.onnx"
    export_onnx([net], path, image_size=16, mean=MEAN, std=STD, export=ExportSection(), optimized_path=optimized)
    weights = optimized.with_name(optimized.name + ".data")
    conv_bytes = 32 * 3 * 3 * 3 * 4
    assert weights.stat().st_size >= conv_bytes > optimized.stat().st_size / 4  # the graph names the file, the file holds the numbers
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    ready = ort.InferenceSession(str(optimized), options, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(6).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["probs"], {"images": images})[0]
    np.testing.assert_allclose(ready.run(["probs"], {"images": images})[0], expected, atol=1e-6)
    weights.unlink()
    with pytest.raises(Exception):  # without its weights the graph cannot be opened
        ort.InferenceSession(str(optimized), options, providers=["CPUExecutionProvider"])


def test_export_that_disagrees_with_torch_is_refused_and_leaves_no_file(tmp_path):
    path, optimized = tmp_path / "broken.onnx", tmp_path / "broken.optimized.onnx"
    with pytest.raises(ExportError, match="parity check failed") as info:
        export_onnx([ExportsSomethingElse()], path, image_size=16, mean=MEAN, std=STD, export=ExportSection(), optimized_path=optimized)
    assert isinstance(info.value, CLAgentError)
    assert not path.exists() and not optimized.exists()


def test_top1_change_is_refused_even_within_atol(tmp_path):
    with pytest.raises(ExportError, match="top-1 differs"):
        export_onnx([FlipsANearTie()], tmp_path / "flip.onnx", image_size=16, mean=MEAN, std=STD, export=ExportSection())
    assert not (tmp_path / "flip.onnx").exists()


def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ExportError, match="at least one module"):
        export_onnx([], tmp_path / "x.onnx", image_size=16, mean=MEAN, std=STD, export=ExportSection())
    with pytest.raises(ExportError, match="real_images"):
        export_onnx(
            [tiny_net()], tmp_path / "x.onnx", image_size=16, mean=MEAN, std=STD, export=ExportSection(),
            real_images=np.zeros((2, 8, 8, 3), np.uint8),
        )
    assert not (tmp_path / "x.onnx").exists()
