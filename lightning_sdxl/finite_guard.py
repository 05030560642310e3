"""Skip optimizer steps whose loss or gradients are not finite; stop the run after too many in a row.

A NaN or inf loss used to train on (Adam turns one NaN gradient into NaN weights) and the run
exited 0 with NaN exports (issue 15). The decision is taken over all ranks, so DDP processes skip
the same steps and their collectives stay matched.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite losses or gradients `limit` optimizer steps in a row."""


def all_finite(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether every given tensor (None skipped) holds only finite numbers (this rank)."""
    # A sharded (DTensor) weight or gradient is checked on this rank's shard; callers reduce over ranks.
    checks = [torch.isfinite(t.to_local() if isinstance(t, DTensor) else t).all() for t in tensors if t is not None]
    return bool(torch.stack(checks).all()) if checks else True


class NonFiniteGuard:
    """Counts skipped steps per optimizer; raises NonFiniteTrainingError after `limit` in a row.

    Args:
        limit: consecutive non-finite steps of one optimizer before the run stops (>= 1).
    """

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"optim.max_nonfinite_steps={limit} must be >= 1.")
        self.limit = limit
        self.in_a_row: dict[str, int] = {}
        self.skipped: dict[str, int] = {}

    def check(self, finite: bool, name: str, what: str, batch: int) -> bool:
        """Record one step of optimizer `name`; True when it may proceed (finite)."""
        if finite:
            self.in_a_row[name] = 0
            return True
        self.in_a_row[name] = self.in_a_row.get(name, 0) + 1
        self.skipped[name] = self.skipped.get(name, 0) + 1
        if self.in_a_row[name] >= self.limit:
            raise NonFiniteTrainingError(
                f"The {name}'s {what} was not finite (NaN or inf) for {self.limit} steps in a row (batch {batch}); "
                "the run stops without exporting. Lower the learning rate (student.lr, discriminator.lr), keep "
                "optim.gradient_clip_val, or raise optim.max_nonfinite_steps to tolerate more."
            )
        return False
