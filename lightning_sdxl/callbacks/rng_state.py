"""Random number generator states in every checkpoint, restored when training resumes, and one
stream per rank.

The training step draws t, the noise and t* from the global torch RNG. Lightning neither saves nor
restores it, so a resumed run drew other noise than the uninterrupted one (issue 15). States are
applied at `on_train_start`, after any sanity validation, where the uninterrupted run stood when it
saved. Stored as tensors and plain lists so checkpoints still load with `weights_only=True`.

Every process of a data-parallel run starts from the same seed (`L.seed_everything`), so without
more each rank would draw the same timesteps and noise for its different images; ranks 1, 2, ...
reseed their torch stream once at the start (`rank_seed`), after the models are built (their
initialisation stays identical). A checkpoint holds every rank's states; a resume on the same
number of ranks gives each its own back, on another number each rank reseeds from rank 0's.
"""

from __future__ import annotations

import random

import lightning as L
import numpy as np
import torch


def collect_rng_states() -> dict:
    """torch (CPU and every CUDA device), numpy and Python `random` states, weights_only-safe."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    version, python_state, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
        "python": [version, list(python_state), gauss_next],
    }


def restore_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, python_state, gauss_next = states["python"]
    random.setstate((version, tuple(python_state), gauss_next))


def rank_seed(seed: int, rank: int) -> int:
    """The torch seed of `rank` in a run seeded `seed` (rank 0 keeps the run's own stream)."""
    return (seed * 1_000_003 + rank) % (2**63)


class RngStateCheckpoint(L.Callback):
    """Saves every rank's RNG states with each checkpoint (`state_dict`) and restores them on resume;
    gives each rank of a fresh data-parallel run its own torch stream."""

    def __init__(self) -> None:
        self.loaded: dict | None = None
        self.trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.trainer = trainer

    def state_dict(self) -> dict:
        states = collect_rng_states()
        if self.trainer is None or self.trainer.world_size == 1:
            return {"per_rank": [states]}
        per_rank = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(per_rank, states)  # every rank saves the checkpoint together
        return {"per_rank": per_rank}

    def load_state_dict(self, state_dict: dict) -> None:
        self.loaded = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        rank, world = trainer.global_rank, trainer.world_size
        if self.loaded is None:  # a fresh run
            if rank > 0:
                torch.manual_seed(rank_seed(torch.initial_seed(), rank))
            return
        per_rank = self.loaded.get("per_rank", [self.loaded])  # older checkpoints: one state for all
        self.loaded = None
        if len(per_rank) == world:
            restore_rng_states(per_rank[rank])
            return
        restore_rng_states(per_rank[0])  # another number of ranks: rank 0's stream, the others reseeded
        if rank > 0:
            torch.manual_seed(rank_seed(int(torch.randint(2**62, ()).item()), rank))
