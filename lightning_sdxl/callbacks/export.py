"""Exports at the end of training: full UNet, scheduler, LoRA (diffusers and kohya) (METHOD.md 5)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch

from lightning_sdxl.export import export_student


class ExportCallback(L.Callback):
    """Writes `lightning_sdxl.export.export_student` into `dirpath` when training ends (global rank 0).

    The folder is replaced atomically: an interrupted export leaves the previous one intact.

    Args:
        dirpath: the export folder (the run directory's `export/`).
        dtype: "float32", "float16" or "bfloat16" for the written weights.
    """

    def __init__(self, dirpath: str, dtype: str = "float32"):
        self.dirpath = Path(dirpath)
        self.dtype = getattr(torch, dtype)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            export_student(pl_module, self.dirpath, self.dtype)
