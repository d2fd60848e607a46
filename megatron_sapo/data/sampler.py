"""Which prompts each step uses: a deterministic shuffle per epoch (seeded by seed and epoch number), walked in
order, resumable from a small state dict saved with the checkpoint. A step asks for as many prompts as it needs
(more under dynamic sampling); epochs roll over transparently."""

from __future__ import annotations

import random

from .datasets import PromptRecord


class PromptSampler:
    def __init__(self, records: list[PromptRecord], *, seed: int = 0, shuffle: bool = True):
        if not records:
            raise ValueError("PromptSampler needs at least one prompt")
        self.records = records
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.records)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def take(self, count: int) -> list[PromptRecord]:
        """The next `count` prompts (crossing into the next epoch's order when this one is used up)."""
        out = []
        while len(out) < count:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            out.append(self.records[self._order[self.position]])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_records": len(self.records)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_records"] != len(self.records) or state["seed"] != self.seed:
            raise ValueError(f"sampler state is for {state['num_records']} prompts with seed {state['seed']}, not "
                             f"{len(self.records)} with seed {self.seed}: the data or its seed changed")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._epoch_order(self.epoch)
