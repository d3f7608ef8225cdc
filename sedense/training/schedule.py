"""The learning-rate schedule: a linear warm-up, then a cosine from ``lr`` down to ``lr * lrf``.

The cosine follows the *progress* of training, a fraction from 0 to 1: with an epoch count, the steps done over the
steps planned; with a time budget, a :class:`~sedense.training.time_plan.TimePlan`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


def cosine_factor(progress: float, lrf: float) -> float:
    """From 1 at progress 0 to ``lrf`` at progress 1, along half a cosine."""
    p = min(max(progress, 0.0), 1.0)
    return lrf + (1 - lrf) * 0.5 * (1 + math.cos(math.pi * p))


class WarmupCosine(LRScheduler):
    """Linear warm-up from 1% over ``warmup_steps``, then :func:`cosine_factor` of ``progress(step)``.

    Every parameter group is scheduled from its own ``initial_lr``, also groups added during training
    (a backbone unfrozen later joins the schedule where it stands).
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, lrf: float, progress: Callable[[int], float]) -> None:
        self.warmup_steps, self.lrf, self.progress = int(warmup_steps), float(lrf), progress
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return 0.01 + 0.99 * step / self.warmup_steps
        return cosine_factor(self.progress(step), self.lrf)

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [group.setdefault("initial_lr", group["lr"]) * factor for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {k: v for k, v in super().state_dict().items() if k != "progress"}  # a function: not saved


def epoch_progress(total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Progress of a run of ``total_steps`` steps, counted after the warm-up."""
    return lambda step: (step - warmup_steps) / max(total_steps - warmup_steps, 1)
