"""Learning-rate schedule: linear warm-up, then cosine decay to a floor (open_clip's ``cosine_lr``).

The schedule is a pure function of the step, so a resumed run continues it exactly from the step
count alone; :func:`warmup_cosine_scheduler` wraps it in a ``LambdaLR`` whose ``last_epoch`` is that
step (save and load its ``state_dict`` with the optimiser).

Step ``k`` is the k-th optimiser update, counted from 0: the update at step k uses ``lr_at(k)``.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def lr_factor(step: int, *, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """Multiplier of the base LR at ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for ``step < warmup_steps`` (so the first update is not at
    LR 0). Then ``min_ratio + 0.5 (1 - min_ratio)(1 + cos(pi * e / E))`` with ``e = step - warmup_steps``
    and ``E = total_steps - warmup_steps``; steps at or past ``total_steps`` stay at ``min_ratio``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = total_steps - warmup_steps
    if decay <= 0:
        return 1.0
    progress = min((step - warmup_steps) / decay, 1.0)
    return min_ratio + 0.5 * (1.0 - min_ratio) * (1.0 + math.cos(math.pi * progress))


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0) -> float:
    """The learning rate at ``step``: ``base_lr * lr_factor(step, ...)``."""
    return base_lr * lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio)


def warmup_cosine_scheduler(optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int = 0,
                            min_ratio: float = 0.0) -> LambdaLR:
    """A ``LambdaLR`` applying :func:`lr_factor` to every parameter group's own base LR.

    After ``k`` calls of ``scheduler.step()`` the optimiser's LRs are those of step ``k``. To resume,
    build it the same way and ``load_state_dict`` the saved state (it restores ``last_epoch``).
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps]; got {warmup_steps}")

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=warmup_steps, min_ratio=min_ratio)

    return LambdaLR(optimizer, factor)
