import pytest
import torch
import torch.nn.functional as F

from cl_agent import losses


def test_ace_mask_hides_unseen_and_absent_previous_classes():
    seen = torch.tensor([1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)  # 0..4 seen
    previous = torch.tensor([1, 1, 1, 0, 0, 0, 0], dtype=torch.bool)  # 0..2 from earlier experiences
    labels = torch.tensor([1, 3, 3])
    hidden = losses.ace_mask(labels, seen, previous)
    # visible: previous class 1 (in the batch), current classes 3 and 4 (4 is not in the batch but current)
    assert hidden.tolist() == [True, False, True, False, False, True, True]


def test_masked_cross_entropy_ignores_hidden_logits():
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 1, 0, 1])
    hidden = torch.tensor([False, False, True, True, True])
    changed = logits.clone()
    changed[:, 2:] += 100.0
    a = losses.masked_cross_entropy(logits, labels, hidden)
    assert torch.allclose(a, losses.masked_cross_entropy(changed, labels, hidden))
    assert torch.allclose(a, F.cross_entropy(logits[:, :2], labels))


def test_symmetry_distillation_zero_iff_student_matches_teacher():
    z = torch.randn(6, 5)
    assert losses.symmetry_distillation(z, z).item() == pytest.approx(0.0, abs=1e-7)
    assert losses.symmetry_distillation(z, torch.randn(6, 5)).item() > 1e-4


def test_symmetry_distillation_formula():
    zs, zt = torch.randn(4, 3), torch.randn(4, 3)
    ps, pt = zs.softmax(1), zt.softmax(1)
    a, c = ps @ pt.T, ps.T @ pt
    expected = ((a - a.T) ** 2).sum() / 4 + ((c - c.T) ** 2).sum() / 3
    assert torch.allclose(losses.symmetry_distillation(zs, zt), expected)


def test_symmetry_distillation_gradient_reaches_only_the_student():
    zs, zt = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    losses.symmetry_distillation(zs, zt).backward()
    assert zs.grad is not None and zs.grad.abs().sum() > 0
    assert zt.grad is None


def test_kl_distillation_zero_when_equal_and_scaled_by_t_squared():
    z = torch.randn(5, 4)
    assert losses.kl_distillation(z, z, 2.0).item() == pytest.approx(0.0, abs=1e-6)
    zs, zt = torch.randn(5, 4), torch.randn(5, 4)
    plain = F.kl_div(F.log_softmax(zs / 2, 1), F.softmax(zt / 2, 1), reduction="batchmean")
    assert losses.kl_distillation(zs, zt, 2.0).item() == pytest.approx(4 * plain.item(), rel=1e-5)


def test_feature_distillation_is_mean_squared_l2():
    s, t = torch.zeros(2, 3), torch.tensor([[1.0, 1.0, 1.0], [2.0, 0.0, 0.0]])
    assert losses.feature_distillation(s, t).item() == pytest.approx((3 + 4) / 2)


def test_rotation_and_memory_replay():
    assert losses.rotation_loss(torch.tensor([[10.0, 0, 0, 0]]), torch.tensor([0])).item() < 1e-3
    z = torch.tensor([[5.0, 0.0, -1e9]])
    assert losses.memory_replay(z, torch.tensor([0]), z).item() == pytest.approx(F.cross_entropy(z, torch.tensor([0])).item(), abs=1e-6)


def test_margin_constraint_zero_when_margins_hold_and_positive_otherwise():
    current = torch.tensor([False, False, True])
    unseen = torch.tensor([False, True, False])
    no_previous = torch.zeros(3, dtype=torch.bool)
    good = torch.tensor([[0.0, -10.0, 10.0]])
    assert losses.margin_constraint(good, current, no_previous, unseen, 0.1).item() == 0.0
    bad = torch.tensor([[0.0, 20.0, 10.0]])  # an unseen class beats the current one by 10
    assert losses.margin_constraint(bad, current, no_previous, unseen, 0.1).item() == pytest.approx(10.1)
    # past part: softmax over current vs over previous classes (two of each here)
    current2 = torch.tensor([True, True, False, False])
    previous2 = torch.tensor([False, False, True, True])
    none = torch.zeros(4, dtype=torch.bool)
    confident_current = torch.tensor([[10.0, 0.0, 0.0, 0.0]])  # current max prob ~1, previous max prob 0.5
    assert losses.margin_constraint(confident_current, current2, previous2, none, 0.1).item() == 0.0
    confident_previous = torch.tensor([[0.0, 0.0, 10.0, 0.0]])
    assert losses.margin_constraint(confident_previous, current2, previous2, none, 0.1).item() > 0.5
