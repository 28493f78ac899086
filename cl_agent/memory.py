"""Representation memory: at most ``capacity`` items of (feature, logits, label), no images.

Items are replayed through the classifier only. Replacement is class-balanced:
when the memory is full, a new item replaces a random item of the most
frequent class (counting the new item's class), so every class keeps about
capacity / classes items.

INVARIANT: len(self) <= capacity; self.count[c] == (self.labels[:len] == c).sum().
"""

from __future__ import annotations

import torch


class Memory:
    def __init__(self, capacity: int, feature_dim: int, num_classes: int, device: torch.device | str = "cpu"):
        self.capacity = capacity
        self.features = torch.zeros(capacity, feature_dim, device=device)  # (N, D)
        self.logits = torch.zeros(capacity, num_classes, device=device)  # (N, K)
        self.labels = torch.zeros(capacity, dtype=torch.long, device=device)  # (N,)
        self.item_labels: list[int] = []  # host copy of labels[:len] for bookkeeping
        self.count: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.item_labels)

    def add(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, gen: torch.Generator) -> None:
        """Offer items (B, D), (B, K), (B,) in order; class-balanced replacement once full."""
        if self.capacity == 0:
            return
        slots: dict[int, int] = {}  # slot -> index of the item written there (the last one wins)
        for i, label in enumerate(labels.tolist()):
            if len(self.item_labels) < self.capacity:
                slot = len(self.item_labels)
                self.item_labels.append(label)
            else:
                counts = dict(self.count)
                counts[label] = counts.get(label, 0) + 1
                top = max(counts.values())
                largest = sorted(c for c, n in counts.items() if n == top)
                victim_class = largest[int(torch.randint(len(largest), (1,), generator=gen))]
                if victim_class == label and self.count.get(label, 0) == 0:
                    continue  # a class not in memory that is itself the largest: nothing to replace (capacity 1)
                candidates = [s for s, c in enumerate(self.item_labels) if c == victim_class]
                slot = candidates[int(torch.randint(len(candidates), (1,), generator=gen))]
                self.count[victim_class] -= 1
                self.item_labels[slot] = label
            self.count[label] = self.count.get(label, 0) + 1
            slots[slot] = i
        if slots:
            where = torch.tensor(list(slots.keys()), device=self.labels.device)
            which = torch.tensor(list(slots.values()), device=features.device)
            self.features[where] = features[which].to(self.features)
            self.logits[where] = logits[which].to(self.logits)
            self.labels[where] = labels[which].to(self.labels.device)

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to n distinct random items: features (n, D), labels (n,), logits (n, K)."""
        n = min(n, len(self))
        index = torch.randperm(len(self), generator=gen)[:n].to(self.labels.device)
        return self.features[index], self.labels[index], self.logits[index]

    def class_counts(self) -> dict[int, int]:
        return {c: n for c, n in sorted(self.count.items()) if n > 0}

    def state_dict(self) -> dict:
        n = len(self)
        return {"features": self.features[:n].cpu(), "logits": self.logits[:n].cpu(), "labels": self.labels[:n].cpu()}

    def load_state_dict(self, state: dict) -> None:
        n = state["labels"].shape[0]
        if n > self.capacity:
            raise ValueError(f"memory state holds {n} items, capacity is {self.capacity}")
        self.features[:n] = state["features"].to(self.features)
        self.logits[:n] = state["logits"].to(self.logits)
        self.labels[:n] = state["labels"].to(self.labels.device)
        self.item_labels = state["labels"].tolist()
        self.count = {}
        for label in self.item_labels:
            self.count[label] = self.count.get(label, 0) + 1
