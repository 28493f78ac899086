"""Cropping padding-only kernel taps: same outputs, fewer weights, and only where it is safe."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from cl_agent.crop import crop_padding_taps, used_taps


def conv_output(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return conv(x)


def test_three_by_three_on_a_one_by_one_map_keeps_only_its_centre_tap():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1).eval()
    x = torch.randn(2, 4, 1, 1)
    expected = conv_output(conv, x)
    centre = conv.weight.detach()[:, :, 1:2, 1:2].clone()
    assert crop_padding_taps(conv, x[:1]) == 6 * 4 * 8
    assert conv.kernel_size == (1, 1) and conv.padding == (0, 0)
    torch.testing.assert_close(conv.weight.detach(), centre)
    torch.testing.assert_close(conv_output(conv, x), expected)


def test_stride_two_on_a_two_by_two_map_keeps_a_two_by_two_corner():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False).eval()
    x = torch.randn(3, 3, 2, 2)
    expected = conv_output(conv, x)
    assert crop_padding_taps(conv, x[:1]) == 5 * 3 * 5
    assert conv.kernel_size == (2, 2) and conv.padding == (0, 0)
    out = conv_output(conv, x)
    assert out.shape == expected.shape == (3, 5, 1, 1)
    torch.testing.assert_close(out, expected)


def test_cropping_any_conv_geometry_leaves_every_output_the_same():
    geometries = [
        (n, k, s, p, d)
        for n, k, s, p, d in itertools.product(range(1, 7), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2, 3), (1, 2))
        if (n + 2 * p - d * (k - 1) - 1) // s + 1 >= 1
    ]
    cropped = 0
    for size, kernel, stride, padding, dilation in geometries:
        torch.manual_seed(size * 1000 + kernel * 100 + stride * 10 + padding + dilation)
        conv = nn.Conv2d(2, 3, kernel, stride=stride, padding=padding, dilation=dilation).eval()
        x = torch.randn(2, 2, size, size + 1)  # H and W differ: each axis is cut on its own
        expected = conv_output(conv, x)
        before = conv.weight.numel()
        removed = crop_padding_taps(conv, x[:1])
        cropped += removed > 0
        assert conv.weight.numel() == before - removed
        out = conv_output(conv, x)
        geometry = f"size={size} kernel={kernel} stride={stride} padding={padding} dilation={dilation}"
        assert out.shape == expected.shape, geometry
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=geometry)
    assert cropped >= 50  # the cut happened in many geometries (51 of 471), not just the easy cases


def test_used_taps_finds_what_brute_force_finds():
    # Which taps of a 3-tap kernel (padding 1) read a real position: all on a 2-wide axis, the centre on a 1-wide one.
    assert used_taps(2, 3, 1, 1, 1) is None
    assert used_taps(1, 3, 1, 1, 1) == (1, 1, 0)
    assert used_taps(2, 3, 2, 1, 1) == (1, 2, 0)
    assert used_taps(1, 5, 1, 2, 1) == (2, 2, 0)


def test_a_conv_run_at_two_sizes_is_left_alone():
    conv = nn.Conv2d(2, 2, 3, padding=1)

    class TwoSizes(nn.Module):
        def forward(self, x):
            return conv(x).mean() + conv(F.avg_pool2d(x, x.shape[-1])).mean()

    assert crop_padding_taps(TwoSizes(), torch.zeros(1, 2, 4, 4)) == 0
    assert conv.kernel_size == (3, 3)


def test_conv_subclasses_and_other_padding_modes_are_left_alone():
    class PadsAtRunTime(nn.Conv2d):  # like timm's Conv2dSame: its forward pads on its own
        def forward(self, x):
            return super().forward(F.pad(x, (1, 1, 1, 1)))

    net = nn.Sequential(PadsAtRunTime(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"))
    assert crop_padding_taps(net, torch.zeros(1, 2, 1, 1)) == 0
    assert [m.kernel_size for m in net] == [(3, 3), (3, 3)]


def test_resnet18_at_32px_loses_most_of_its_last_stage_and_none_of_its_answers():
    from cl_agent.config import ModelSection
    from cl_agent.student import create_student

    torch.manual_seed(0)
    student = create_student(ModelSection(backbone="resnet18", num_classes=10, image_size=32)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = student(x)
    before = sum(p.numel() for p in student.parameters())
    removed = crop_padding_taps(student, x[:1])
    assert sum(p.numel() for p in student.parameters()) == before - removed
    assert removed > 0.5 * before  # the 1x1 maps of the last stage
    assert student.backbone.layer4[1].conv2.kernel_size == (1, 1)
    assert student.backbone.layer1[0].conv1.kernel_size == (3, 3)  # 8x8 maps: every tap is used
    with torch.no_grad():
        torch.testing.assert_close(student(x), expected, rtol=1e-4, atol=1e-5)


def test_depthwise_conv_on_a_one_by_one_map_is_cut_per_channel():
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 6, 5, padding=2, groups=6).eval()
    x = torch.randn(2, 6, 1, 1)
    expected = conv_output(conv, x)
    assert crop_padding_taps(conv, x[:1]) == 6 * 24
    assert conv.weight.shape == (6, 1, 1, 1)
    torch.testing.assert_close(conv_output(conv, x), expected)
