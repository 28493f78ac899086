"""Representation memory: at most ``capacity`` items of (feature, logits, label), no images.

Items are replayed through the classifier only. Replacement is class-balanced:
when the memory is full, a new item replaces a random item of the most
frequent class (counting the new item's class), so every class keeps about
capacity / classes items.

INVARIANT: len(self) <= capacity; slots[c] lists exactly the slots holding class c, sorted
(so a restored memory makes the same random choices as the original).
"""

from __future__ import annotations

import bisect

import torch

from cl_agent.device import to_device


class Memory:
    def __init__(self, capacity: int, feature_dim: int, num_classes: int, device: torch.device | str = "cpu"):
        self.capacity = capacity
        self.features = torch.zeros(capacity, feature_dim, device=device)  # (N, D)
        self.logits = torch.zeros(capacity, num_classes, device=device)  # (N, K)
        self.labels = torch.zeros(capacity, dtype=torch.long, device=device)  # (N,)
        self.size = 0
        self.slots: dict[int, list[int]] = {}  # class -> slots holding it (host-side bookkeeping)

    def __len__(self) -> int:
        return self.size

    def _slot_for(self, label: int, draws: tuple[float, float]) -> int | None:
        """Where a new item of ``label`` goes, updating the bookkeeping; None = not stored.

        ``draws`` are two uniform numbers in [0, 1) that pick the class and the slot to replace.
        """
        if self.size < self.capacity:
            self.size += 1
            slot = self.size - 1
        else:
            counts = {c: len(s) for c, s in self.slots.items() if s}
            counts[label] = counts.get(label, 0) + 1
            top = max(counts.values())
            largest = sorted(c for c, n in counts.items() if n == top)
            victim = largest[int(draws[0] * len(largest))]
            if not self.slots.get(victim):
                return None  # the new item's own class is the largest and holds nothing (capacity < classes)
            victims = self.slots[victim]
            slot = victims.pop(int(draws[1] * len(victims)))
        bisect.insort(self.slots.setdefault(label, []), slot)
        return slot

    def add(self, features: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | list[int], gen: torch.Generator) -> None:
        """Offer items (B, D), (B, K), (B,) in order; class-balanced replacement once full."""
        if self.capacity == 0:
            return
        labels = labels.tolist() if isinstance(labels, torch.Tensor) else list(labels)
        draws = torch.rand(len(labels), 2, generator=gen, dtype=torch.float64).tolist()  # one call, not two per item
        written: dict[int, int] = {}  # slot -> item written there (a later item in the same call wins)
        for i, label in enumerate(labels):
            slot = self._slot_for(label, draws[i])
            if slot is not None:
                written[slot] = i
        if written:
            slots = torch.tensor([list(written), list(written.values()), [labels[i] for i in written.values()]])
            where, which, new_labels = to_device(slots, self.labels.device)  # one copy for the three
            self.features[where] = features[which].to(self.features)
            self.logits[where] = logits[which].to(self.logits)
            self.labels[where] = new_labels

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Up to n distinct random items: features (n, D), labels (n,), logits (n, K)."""
        n = min(n, len(self))
        index = to_device(torch.randperm(len(self), generator=gen)[:n], self.labels.device)
        return self.features[index], self.labels[index], self.logits[index]

    def class_counts(self) -> dict[int, int]:
        return {c: len(s) for c, s in sorted(self.slots.items()) if s}

    def state_dict(self) -> dict:
        n = self.size
        return {"features": self.features[:n].cpu(), "logits": self.logits[:n].cpu(), "labels": self.labels[:n].cpu()}

    def load_state_dict(self, state: dict) -> None:
        n = state["labels"].shape[0]
        if n > self.capacity:
            raise ValueError(f"memory state holds {n} items, capacity is {self.capacity}")
        self.features[:n] = state["features"].to(self.features)
        self.logits[:n] = state["logits"].to(self.logits)
        self.labels[:n] = state["labels"].to(self.labels.device)
        self.size = n
        self.slots = {}
        for slot, label in enumerate(state["labels"].tolist()):
            self.slots.setdefault(label, []).append(slot)
