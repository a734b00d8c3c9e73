"""Exponential moving average of the weights (`train.ema_decay`), kept beside the trained model.

After every optimizer step that updated the weights, each EMA parameter moves towards the model's:
`ema = ema + (1 - d) * (param - ema)` with `d = min(ema_decay, (1 + n) / (10 + n))` after n updates. The
warm-up in the second term is TensorFlow's `ExponentialMovingAverage(num_updates=...)` rule: without it the
average would be dominated for ~1 / (1 - d) steps by the random initial weights (with d = 0.999, the first
thousand steps), and a short run's EMA would be worse than its last weights for no reason.

BatchNorm buffers (running mean/var, the batch counter) are copied from the model, not averaged, as
timm's ModelEmaV2/V3 and torchvision's reference `ExponentialMovingAverage(use_buffers=False)` do: averaged
running statistics would describe none of the weights they sit beside. Every rank computes the same
average (DDP keeps the parameters identical, and with SyncBatchNorm the copied buffers are identical too),
so the EMA needs no communication per step; without SyncBatchNorm the Validator
(dist_seg.train.validation) broadcasts rank 0's buffers (`distributed.broadcast_buffers_`) before each
evaluation, as it does for the model's buffers.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from dist_seg.models import unwrap


class WeightEMA:
    """The averaged copy of a model: `module` is a frozen nn.Module of the same architecture, in eval mode."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"train.ema_decay={decay}: must be in (0, 1), e.g. 0.999")
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average one step towards `model`'s weights (after an optimizer step)."""
        d = self.current_decay()
        src = unwrap(model)
        ema_p = [p for p in self.module.parameters() if p.dtype.is_floating_point]
        new_p = [p.detach() for p in src.parameters() if p.dtype.is_floating_point]
        torch._foreach_lerp_(ema_p, new_p, 1.0 - d)
        for e, b in zip(self.module.buffers(), src.buffers(), strict=True):
            e.copy_(b)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "weights": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a saved average (its update count too, so the warm-up continues where it was); the decay
        stays this run's train.ema_decay."""
        self.module.load_state_dict(state["weights"])
        self.updates = int(state["updates"])

    def reset_to(self, model: nn.Module) -> None:
        """Start the average at `model`'s weights (a resume from a checkpoint that had no EMA)."""
        self.module.load_state_dict(unwrap(model).state_dict())
        self.updates = 0
