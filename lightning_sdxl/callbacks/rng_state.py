"""Random number generator states in every checkpoint, restored when training resumes.

The training step draws t, the noise and t* from the global torch RNG. Lightning neither saves nor
restores it, so a resumed run drew other noise than the uninterrupted one (issue 15). States are
applied at `on_train_start`, after any sanity validation, where the uninterrupted run stood when it
saved. Stored as tensors and plain lists so checkpoints still load with `weights_only=True`.
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


class RngStateCheckpoint(L.Callback):
    """Saves the RNG states with each checkpoint (`state_dict`) and restores them on resume."""

    def __init__(self) -> None:
        self.loaded: dict | None = None

    def state_dict(self) -> dict:
        return collect_rng_states()

    def load_state_dict(self, state_dict: dict) -> None:
        self.loaded = state_dict

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.loaded is not None:
            restore_rng_states(self.loaded)
            self.loaded = None
