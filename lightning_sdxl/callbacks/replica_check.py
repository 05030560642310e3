"""Fail a data-parallel run whose replicas drifted apart (unsynchronised gradients)."""

from __future__ import annotations

import lightning as L
import torch
from torch.distributed.tensor import DTensor


class ReplicaConsistencyCheck(L.Callback):
    """At the end of training, every rank's trainable weights must be identical.

    Manual optimization with two optimizers under DDP relies on each backward being reduced across
    ranks; if it were not, ranks would train on their own data shards and silently diverge. This
    compares one checksum per rank (a few floats, once per run) and raises if they differ.

    Args:
        atol: tolerated absolute difference of the checksums.
    """

    def __init__(self, atol: float = 1e-5):
        self.atol = atol

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size == 1:
            return
        # Sharded weights (trainer=fsdp) exist once, split over ranks: nothing to compare.
        parameters = [p.detach().float() for p in pl_module.parameters() if p.requires_grad and not isinstance(p, DTensor)]
        if not parameters:
            return
        checksum = torch.stack([torch.stack([p.sum(), p.abs().sum()]) for p in parameters]).sum(0)
        gathered = pl_module.all_gather(checksum)  # (world_size, 2)
        spread = (gathered - gathered[0]).abs().max().item()
        if spread > self.atol:
            raise RuntimeError(
                f"Trainable weights differ across the {trainer.world_size} ranks (checksum spread {spread:.3g}): "
                "gradients were not synchronised; use a DDP strategy with find_unused_parameters=True."
            )
