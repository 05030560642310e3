"""Validation image grid: fixed prompts and seeds, teacher (n steps) above student (METHOD.md 5)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torchvision.utils import make_grid, save_image

from lightning_sdxl.io import atomic_path


class SampleGrid(L.Callback):
    """Writes `samples/step_XXXXXX.png` under `dirpath` and logs the grid to TensorBoard.

    Rows: the image entries of the module's `validation_outputs` (teacher, student; or a teacher's
    guided, unguided samples) in order; columns: the validation prompts in seed order, gathered
    from all ranks. Reads what the module's `validation_step` left in `validation_outputs`.

    Args:
        dirpath: folder of the PNG grids (the run directory's `samples/`).
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        outputs = pl_module.validation_outputs
        if trainer.sanity_checking or not outputs:
            return
        rows = {}
        seeds = pl_module.all_gather(torch.cat([output["seed"] for output in outputs])).reshape(-1)
        for row in (key for key in outputs[0] if key != "seed"):
            images = pl_module.all_gather(torch.cat([output[row] for output in outputs]))
            rows[row] = images.reshape(-1, *images.shape[-3:])
        # One column per seed, in seed order (a DistributedSampler may repeat items to pad).
        order = [int((seeds == seed).nonzero()[0]) for seed in seeds.unique(sorted=True)]
        grid = make_grid(torch.cat([images[order] for images in rows.values()]), nrow=len(order), padding=2)
        if not trainer.is_global_zero:
            return
        step = pl_module.batches_trained
        with atomic_path(self.dirpath / f"step_{step:06d}.png") as temporary:
            save_image(grid, temporary, format="png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"samples/{'_over_'.join(rows)}", grid, global_step=step)
