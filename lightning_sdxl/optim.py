"""LR schedules, stepped by the module once per batch (manual optimization)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def linear_warmup(optimizer: Optimizer, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up from 0 to the optimizer's lr over `warmup_steps` batches, then constant."""
    return LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)
