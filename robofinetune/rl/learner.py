"""The part of every RL learner a checkpoint must restore exactly, written once for residual, OGPO and DPPO."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class CheckpointedLearner(nn.Module):
    """Networks (the module's state dict), named optimisers, the update generator and step counters.

    A subclass names its optimiser attributes in ``optimizers`` and its integer counters in ``counters`` and
    sets ``self.generator``; ``learner_state`` / ``load_learner_state`` then round-trip all of it, so a resumed
    run draws the same noise and takes the same delayed-update decisions as one that was never stopped.
    """

    optimizers: tuple[str, ...] = ()
    counters: tuple[str, ...] = ()
    generator: torch.Generator

    def learner_state(self) -> dict[str, Any]:
        return {"networks": self.state_dict(), "generator": self.generator.get_state(),
                **{name: getattr(self, name).state_dict() for name in self.optimizers},
                **{name: getattr(self, name) for name in self.counters}}

    def load_learner_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["networks"])
        self.generator.set_state(state["generator"])
        for name in self.optimizers:
            getattr(self, name).load_state_dict(state[name])
        for name in self.counters:
            setattr(self, name, int(state[name]))
