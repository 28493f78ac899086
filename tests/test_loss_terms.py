"""Loss terms checked against their written formulas on inputs where every part matters."""

import torch
import torch.nn.functional as F

from cl_agent import losses


def test_memory_replay_is_ce_plus_kl_from_stored_to_current_logits():
    # docs/method.md: CE(classifier(f_m), y_m) + KL(softmax(z_m) || softmax(classifier(f_m))), T = 1, mean over B
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.1, 1.5, 0.3]])  # current classifier on the stored features
    stored = torch.tensor([[-1.0, 2.0, 0.5], [1.0, 0.0, 2.5]])  # logits as stored in the memory: differ from current
    labels = torch.tensor([0, 1])

    ce = F.cross_entropy(logits, labels)
    p_stored, p_current = stored.softmax(dim=1), logits.softmax(dim=1)
    kl = (p_stored * (p_stored.log() - p_current.log())).sum(dim=1).mean()
    result = losses.memory_replay(logits, labels, stored)

    assert torch.allclose(result, ce + kl, atol=1e-6)
    assert result.item() > ce.item() + 0.1  # the KL term counts, not only the label
    # the direction: KL(current || stored) differs on these inputs
    reverse = (p_current * (p_current.log() - p_stored.log())).sum(dim=1).mean()
    assert not torch.allclose(result, ce + reverse, atol=1e-3)


def test_memory_replay_equals_ce_when_stored_logits_are_current():
    logits = torch.tensor([[2.0, 0.5, -1.0]])
    labels = torch.tensor([2])
    assert torch.allclose(losses.memory_replay(logits, labels, logits.clone()), F.cross_entropy(logits, labels), atol=1e-6)


def test_margin_constraint_averages_over_violating_rows_only():
    # future part only: class 0 current, class 1 unseen, no previous classes
    current = torch.tensor([True, False])
    previous = torch.tensor([False, False])
    unseen = torch.tensor([False, True])
    margin = 0.5
    logits = torch.tensor(
        [
            [3.0, 0.0],  # current beats unseen by 3 > margin: no violation
            [1.0, 2.0],  # unseen beats current: violation 2 + 0.5 - 1 = 1.5
        ]
    )
    result = losses.margin_constraint(logits, current, previous, unseen, margin)
    assert result.item() == 1.5  # mean over the one violating row, not 1.5 / 2


def test_margin_constraint_past_part_averages_over_violating_rows_only():
    # past part only: classes 0-1 current, 2-3 previous, nothing unseen (two classes each, so that
    # the softmax maxima are below 1)
    current = torch.tensor([True, True, False, False])
    previous = torch.tensor([False, False, True, True])
    unseen = torch.zeros(4, dtype=torch.bool)
    margin = 0.1
    logits = torch.tensor(
        [
            [5.0, 0.0, 0.0, 0.0],  # current max prob ~0.993, previous max 0.5: no violation
            [0.0, 0.0, 5.0, 0.0],  # current max 0.5, previous max ~0.993: violation ~0.593
        ]
    )
    good = logits[:, :2].softmax(dim=1).amax(dim=1)
    bad = logits[:, 2:].softmax(dim=1).amax(dim=1)
    violation = bad + margin - good
    assert violation[0] < 0 < violation[1]
    result = losses.margin_constraint(logits, current, previous, unseen, margin)
    assert torch.allclose(result, violation[1], atol=1e-6)


def test_margin_constraint_is_zero_without_violations():
    current = torch.tensor([True, False])
    unseen = torch.tensor([False, True])
    logits = torch.tensor([[3.0, 0.0], [4.0, 1.0]])
    assert losses.margin_constraint(logits, current, torch.zeros(2, dtype=torch.bool), unseen, 0.5).item() == 0.0
