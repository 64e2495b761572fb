"""Learning-rate schedule of the pretraining recipe: linear warm-up, then cosine decay.

The schedule is a pure function of the global step (``epoch * steps_per_epoch + step``) and
is written into the optimizer before every step, so a resumed run continues it exactly.
"""

from __future__ import annotations

import math
from typing import List


class WarmupCosineLR:
    """Linear warm-up from 0 to ``base_lr`` over ``warmup_steps``, then cosine decay to
    ``min_lr`` at ``total_steps`` (same constructor and methods as the published class).
    """

    def __init__(self, optimizer, total_steps: int, base_lr: float, warmup_steps: int = 0,
                 min_lr: float = 0.0):
        self.optimizer = optimizer
        self.total_steps = max(1, int(total_steps))
        self.base_lr = base_lr
        self.warmup_steps = max(0, int(warmup_steps))
        self.min_lr = min_lr
        self.last_step = 0

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * step / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) /
                       max(1, self.total_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * progress))

    def step(self, step: int = None) -> float:
        """Set the learning rate of every parameter group for global ``step``; return it."""
        self.last_step = self.last_step if step is None else step
        lr = self.lr_at(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def get_full_schedule(self) -> List[float]:
        """The learning rate at every step 0 .. total_steps - 1 (for plots)."""
        return [self.lr_at(step) for step in range(self.total_steps)]

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "base_lr": self.base_lr, "min_lr": self.min_lr}
