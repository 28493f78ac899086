import torch

from cl_agent.memory import Memory


def _offer(memory, labels, gen, d=3, k=10):
    labels = torch.as_tensor(labels)
    feats = labels.float().view(-1, 1).repeat(1, d)  # feature value = label, to check items stay consistent
    memory.add(feats, torch.randn(len(labels), k), labels, gen)


def test_memory_never_exceeds_capacity_and_stays_class_balanced():
    gen = torch.Generator().manual_seed(0)
    memory = Memory(capacity=20, feature_dim=3, num_classes=10)
    for experience in range(5):  # 2 new classes per experience, 30 items each
        labels = torch.arange(2 * experience, 2 * experience + 2).repeat(30)
        _offer(memory, labels, gen)
        assert len(memory) <= 20
        counts = memory.class_counts()
        assert sorted(counts) == list(range(2 * experience + 2))
        assert max(counts.values()) - min(counts.values()) <= 1, counts
    assert len(memory) == 20 and set(memory.class_counts().values()) == {2}
    # every stored item is consistent: feature value == label
    assert torch.equal(memory.features[:, 0].long(), memory.labels)


def test_memory_sample_and_state_round_trip():
    gen = torch.Generator().manual_seed(0)
    memory = Memory(capacity=8, feature_dim=3, num_classes=10)
    _offer(memory, [0, 1, 2], gen)
    feats, labels, logits = memory.sample(10, gen)
    assert feats.shape == (3, 3) and labels.shape == (3,) and logits.shape == (3, 10)
    restored = Memory(capacity=8, feature_dim=3, num_classes=10)
    restored.load_state_dict(memory.state_dict())
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    more = torch.tensor([3, 3, 4, 4, 5, 5, 6, 6, 7])
    _offer(memory, more, g1)
    _offer(restored, more, g2)
    assert memory.class_counts() == restored.class_counts()
    assert torch.equal(memory.labels, restored.labels) and torch.equal(memory.features, restored.features)


def test_zero_capacity_memory_stores_nothing():
    memory = Memory(capacity=0, feature_dim=3, num_classes=10)
    _offer(memory, [1, 2], torch.Generator())
    assert len(memory) == 0
