"""Exports at the end of training: the module's `export` (a distilled student: full UNet, scheduler,
LoRA in diffusers and kohya format, METHOD.md 5; a trained teacher: its SDXL pipeline folder)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch

from lightning_sdxl.export import INFO_FILE, export_student
from lightning_sdxl.sharding import gathered_for_export


def write_export(module: L.LightningModule, dirpath: Path, dtype: torch.dtype, single_file: bool) -> None:
    """A module's own `export` (the toy teacher's pipeline folder), else the student's exports."""
    if hasattr(module, "export"):
        module.export(dirpath, dtype, single_file=single_file)
    else:
        export_student(module, dirpath, dtype, single_file=single_file)


class ExportCallback(L.Callback):
    """Writes the student's exports (lightning_sdxl/export.py), or a module's own `export`, when
    training ends (global rank 0).

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
        self.exported_at: int | None = None  # the global step of this process's last export

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._export(trainer, pl_module)

    def _export(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Every rank: sharded weights are gathered (a collective, sharding.py); rank 0 writes."""
        with gathered_for_export(pl_module, trainer.is_global_zero):
            if trainer.is_global_zero:
                write_export(pl_module, self.dirpath, self.dtype, self.single_file)
        self.exported_at = trainer.global_step

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Resuming a run that had finished training (killed during its export) skips on_train_end:
        Lightning's fit loop returns at once. Export here when the finished run has no export of its
        last step (export_info.json, written last, says which step)."""
        if trainer.max_steps < 0 or trainer.global_step < trainer.max_steps or self.exported_at == trainer.global_step:
            return
        info = self.dirpath / INFO_FILE
        exported = info.is_file() and json.loads(info.read_text()).get("global_step") == trainer.global_step
        if not trainer.strategy.broadcast(exported):  # rank 0's file decides for every rank
            self._export(trainer, pl_module)
