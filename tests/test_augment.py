import torch

from cl_agent.augment import AugmentSettings, augment, to_float


def _images(n=6, s=16):
    return torch.randint(0, 256, (n, s, s, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_augment_shape_range_and_reproducibility():
    images = _images()
    a = augment(images, AugmentSettings(), torch.Generator().manual_seed(1))
    b = augment(images, AugmentSettings(), torch.Generator().manual_seed(1))
    c = augment(images, AugmentSettings(), torch.Generator().manual_seed(2))
    assert a.shape == (6, 3, 16, 16) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_no_op_settings_give_the_input_back():
    images = _images()
    settings = AugmentSettings(ops=0, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=False)
    out = augment(images, settings, torch.Generator().manual_seed(0))
    assert torch.allclose(out, to_float(images), atol=1e-5)


def test_every_op_runs_on_a_batch():
    # many images, many ops: every colour and geometric op is drawn at least once
    images = _images(n=64)
    out = augment(images, AugmentSettings(ops=4, magnitude=30), torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and out.shape == (64, 3, 16, 16)
