"""Exports at the end of training: the module's `export` (a distilled student: full UNet, scheduler,
LoRA in diffusers and kohya format, METHOD.md 5; a trained teacher: its SDXL pipeline folder)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class ExportCallback(L.Callback):
    """Writes the module's `export(dirpath, dtype)` when training ends (global rank 0).

    The folder is replaced atomically: an interrupted export leaves the previous one intact.

    Args:
        dirpath: the export folder (the run directory's `export/`).
        dtype: "float32", "float16" or "bfloat16" for the written weights.
        single_file: also write the all-in-one checkpoint (lightning_sdxl/single_file.py).
    """

    def __init__(self, dirpath: str, dtype: str = "float32", single_file: bool = True):
        self.dirpath = Path(dirpath)
        self.dtype = getattr(torch, dtype)
        self.single_file = single_file

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            pl_module.export(self.dirpath, self.dtype, single_file=self.single_file)
