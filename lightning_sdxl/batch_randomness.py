"""The random draws of a training batch, per sample: the posterior sample of x0, t (and the
teacher's path), the noise of x_t and the re-noising t* and noise (METHOD.md 2-3).

Each sample draws from its own generator, seeded by (run seed, batch number, the sample's row in
the global batch). A data-parallel rank holds rows rank, rank + world, ... of the global batch (the
rows `data/resumable.py`'s sampler gives it), so a batch's draws do not depend on how many
processes share it: 2 processes of batch B draw what 1 process of batch 2 B draws, row for row,
and a resumed run draws what the uninterrupted one did (the batch number is in the checkpoint).
The generators are CPU ones (the same numbers on any device); drawing per sample costs each rank
only its own rows.

Without a batch number (a notebook's or a test's own `module.jump`), draws come from torch's
global generator, as the step drew them before.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch


class BatchRandomness:
    """Per-sample generators of one batch, or the global generator when `generators` is None."""

    def __init__(self, batch: int, generators: list[torch.Generator] | None = None):
        if generators is not None and len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for a batch of {batch}")
        self.batch, self.generators = batch, generators

    @classmethod
    def for_rank(cls, seed: int, batch_number: int, batch: int, rank: int, world_size: int) -> BatchRandomness:
        """The local rows' generators: local row j is global row j * world_size + rank."""
        rows = [j * world_size + rank for j in range(batch)]
        generators = [
            torch.Generator().manual_seed(int(np.random.SeedSequence([seed % 2**64, batch_number, row]).generate_state(1, np.uint64)[0] >> 1))
            for row in rows
        ]
        return cls(batch, generators)

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like `like` (B, ...), one draw per sample."""
        if self.generators is None:
            return torch.randn_like(like)
        noise = [torch.randn(like.shape[1:], generator=generator) for generator in self.generators]
        return torch.stack(noise).to(like.device, like.dtype)

    def per_sample(self, draw: Callable[[int, torch.Generator | None], torch.Tensor]) -> torch.Tensor:
        """`draw(n, generator)` (a tensor whose last dimension is the batch, e.g. `StageGrid.draw`)
        for the whole batch, each sample's column from its own generator."""
        if self.generators is None:
            return draw(self.batch, None)
        return torch.cat([draw(1, generator) for generator in self.generators], dim=-1)
