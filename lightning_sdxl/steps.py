"""The step convention, in one place.

Everything a user configures (`steps`, validation and checkpoint intervals) counts batches.
Lightning's `trainer.global_step` counts optimizer steps: an adversarial batch steps two optimizers
(generator, discriminator), an MSE or teacher batch one, and with gradient accumulation only every
`accumulate`-th batch steps. These two functions convert; nothing else does the arithmetic.
"""

from __future__ import annotations


def to_optimizer_steps(batches: int, optimizers_per_batch: int, accumulate: int = 1) -> int:
    """Lightning global steps after `batches` batches."""
    return batches // accumulate * optimizers_per_batch


def to_batches(global_step: int, optimizers_per_batch: int, accumulate: int = 1) -> int:
    """Batches trained when Lightning's global step is `global_step`."""
    return global_step // optimizers_per_batch * accumulate
