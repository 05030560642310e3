"""`data=cached`: training from a latent cache (data/latent_cache.py) instead of images."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from lightning_sdxl.data.datamodules import FolderDataModule
from lightning_sdxl.data.latent_cache import CachedLatents

VALIDATION_IMAGES = "validation.safetensors"


class CachedDataModule(FolderDataModule):
    """Cached posteriors and conditions for training; the source's validation prompts, seeds and
    images (stored with the cache) for validation grids and metrics.

    Args:
        cache_dir: a folder `python -m lightning_sdxl.precompute` wrote.
        resolution: the run's resolution (must be the cache's; checked before models load).
        batch_size, num_workers, seed: as the image sources'. The order is the source's: shuffled by
            `seed` unless the source was the toy world (its items are random by index).
        num_val_prompts: at most the number stored with the cache.
    """

    def __init__(
        self,
        cache_dir: str,
        resolution: int = 1024,
        batch_size: int = 4,
        num_workers: int = 2,
        num_val_prompts: int = 8,
        seed: int = 0,
    ) -> None:
        dataset = CachedLatents(cache_dir)
        super().__init__(
            root=None, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
            num_val_prompts=num_val_prompts, seed=seed, dataset=dataset,
        )
        self.hparams["cache_dir"] = cache_dir
        validation = dataset.info["validation"]
        num_val = min(num_val_prompts, len(validation["prompts"]))
        self.val_prompts, self.val_seeds = validation["prompts"][:num_val], validation["seeds"][:num_val]
        self.shuffle = dataset.info["shuffle"]

    def validation_images(self) -> torch.Tensor:
        """The (N, 3, R, R) source images in [-1, 1] whose captions are the validation prompts."""
        images = load_file(str(Path(self.hparams.cache_dir) / VALIDATION_IMAGES))["pixel_values"]
        return images[: len(self.val_prompts)]
