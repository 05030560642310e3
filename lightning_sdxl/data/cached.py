"""`data=cached`: training from a latent cache (data/latent_cache.py) instead of images."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_sdxl.data.datamodules import resumable_sampler, validation_sampler
from lightning_sdxl.data.latent_cache import CachedLatents
from lightning_sdxl.data.prompts import PromptDataset
from lightning_sdxl.errors import ConfigError

VALIDATION_IMAGES = "validation.safetensors"


class CachedDataModule(L.LightningDataModule):
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
        super().__init__()
        self.save_hyperparameters()
        self.dataset = CachedLatents(cache_dir)
        if len(self.dataset) < batch_size:
            raise ConfigError(
                f"data.cache_dir={cache_dir} holds {len(self.dataset)} items, fewer than one batch "
                f"(data.batch_size={batch_size}): precompute more or lower data.batch_size."
            )
        validation = self.dataset.info["validation"]
        num_val = min(num_val_prompts, len(validation["prompts"]))
        self.val_prompts, self.val_seeds = validation["prompts"][:num_val], validation["seeds"][:num_val]
        self.shuffle = self.dataset.info["shuffle"]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.hparams.batch_size,
            sampler=resumable_sampler(self, len(self.dataset), shuffle=self.shuffle, seed=self.hparams.seed),
            drop_last=True,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        prompts = PromptDataset(self.val_prompts, self.val_seeds)
        return DataLoader(
            prompts, batch_size=min(self.hparams.batch_size, len(self.val_prompts)), sampler=validation_sampler(self, prompts)
        )

    def validation_images(self) -> torch.Tensor:
        """The (N, 3, R, R) source images in [-1, 1] whose captions are the validation prompts."""
        images = load_file(str(Path(self.hparams.cache_dir) / VALIDATION_IMAGES))["pixel_values"]
        return images[: len(self.val_prompts)]
