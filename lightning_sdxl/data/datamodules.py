"""LightningDataModules: the toy world (CPU-sized experiments), a folder of real images, and a
COCO-style captions file."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from lightning_sdxl.data.coco import CocoCaptionsDataset
from lightning_sdxl.data.filters import SampleFilters
from lightning_sdxl.data.folder import BadSample, FolderDataset
from lightning_sdxl.data.manifest import ManifestDataset
from lightning_sdxl.data.prompts import PromptDataset
from lightning_sdxl.data.resumable import ResumableSampler
from lightning_sdxl.data.shards import ShardDataset
from lightning_sdxl.data.toy_world import ToyWorld
from lightning_sdxl.errors import ConfigError


def resumable_sampler(datamodule: L.LightningDataModule, size: int, shuffle: bool, seed: int) -> ResumableSampler:
    """This rank's sampler, resuming after the batches the (restored) module has trained."""
    trainer = datamodule.trainer
    module = trainer.lightning_module if trainer is not None else None
    return ResumableSampler(
        size, datamodule.hparams.batch_size, shuffle, seed, start_batch=getattr(module, "batches_trained", 0),
        rank=trainer.global_rank if trainer is not None else 0,
        world_size=trainer.world_size if trainer is not None else 1,
    )


def validation_sampler(datamodule: L.LightningDataModule, dataset: Dataset) -> DistributedSampler | None:
    """This rank's share of the validation prompts under several processes (padded by repeats, as
    Lightning's own replacement did before train.py turned it off for the resumable sampler)."""
    trainer = datamodule.trainer
    if trainer is None or trainer.world_size == 1:
        return None
    return DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)


# Validation scenes are the toy world's items VAL_INDEX_START - 1, - 2, ...: far past any epoch.
VAL_INDEX_START = 2**40


class ToyWorldDataModule(L.LightningDataModule):
    """Toy world scenes for training; captions of held-out scenes, with fixed seeds, for validation.

    Args:
        resolution: image side R in pixels.
        batch_size: training batch size (validation uses min(batch_size, num_val_prompts)).
        num_workers: training DataLoader workers.
        train_size: items per training epoch.
        num_val_prompts: validation prompts; their seeds are 0..num_val_prompts-1.
        seed: the toy world's seed.
        world: the toy world's vocabulary ("simple": the committed teacher's; "rich").
    """

    def __init__(
        self,
        resolution: int = 128,
        batch_size: int = 8,
        num_workers: int = 0,
        train_size: int = 1_000_000,
        num_val_prompts: int = 8,
        seed: int = 0,
        world: str = "simple",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if num_val_prompts < 1 or train_size > VAL_INDEX_START - num_val_prompts:
            raise ValueError(
                f"need num_val_prompts >= 1 and train_size <= {VAL_INDEX_START - num_val_prompts} "
                f"(validation scenes are held out), got {num_val_prompts} and {train_size}"
            )
        self.world = ToyWorld(resolution=resolution, size=train_size, seed=seed, world=world)
        self.val_indices = [VAL_INDEX_START - 1 - k for k in range(num_val_prompts)]
        self.val_prompts = [self.world.scene(i).caption for i in self.val_indices]
        self.val_seeds = list(range(num_val_prompts))

    def train_dataloader(self) -> DataLoader:
        # Not shuffled: items are already random by index; the sampler shards them over ranks.
        return DataLoader(
            self.world,
            batch_size=self.hparams.batch_size,
            sampler=resumable_sampler(self, len(self.world), shuffle=False, seed=self.hparams.seed),
            drop_last=True,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        prompts = PromptDataset(self.val_prompts, self.val_seeds)
        return DataLoader(
            prompts,
            batch_size=min(self.hparams.batch_size, self.hparams.num_val_prompts),
            sampler=validation_sampler(self, prompts),
        )

    def validation_images(self) -> torch.Tensor:
        """The (N, 3, R, R) images in [-1, 1] that the validation prompts describe, in order."""
        return torch.stack([self.world[i]["pixel_values"] for i in self.val_indices])


class FolderDataModule(L.LightningDataModule):
    """A folder of captioned images (see FolderDataset); its first captions validate.

    The dataset is indexed in `__init__`, so a bad `root` fails before any model loads.

    Args:
        root: folder of images with sidecar .txt captions.
        resolution: side R of the square training crops.
        batch_size: training batch size (validation uses min(batch_size, num_val_prompts)).
        num_workers: training DataLoader workers.
        num_val_prompts: validation prompts, the captions of the first items in sorted order
            (fewer if the folder holds fewer); their seeds are 0, 1, ...
        seed: seed of the training shuffle.
        dataset: a ready dataset with the same contract and a `caption(i)` (subclasses).
        filters: `SampleFilters` settings (data/filters.py): min_side, min_sharpness, clean_captions.
    """

    shuffle = True  # the training order; a latent cache of the toy world keeps the world's (data/cached.py)

    def __init__(
        self,
        root: str | None,
        resolution: int = 1024,
        batch_size: int = 4,
        num_workers: int = 4,
        num_val_prompts: int = 8,
        seed: int = 0,
        dataset: Dataset | None = None,
        filters: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["dataset"])
        if num_val_prompts < 1:
            raise ValueError(f"need num_val_prompts >= 1, got {num_val_prompts}")
        self.dataset = dataset if dataset is not None else FolderDataset(root, resolution)
        self.dataset.filters = SampleFilters(**(filters or {}))
        if len(self.dataset) < batch_size:
            raise ConfigError(
                f"the data holds {len(self.dataset)} images, fewer than one batch (data.batch_size={batch_size}): "
                "add images or lower data.batch_size."
            )
        num_val = min(num_val_prompts, len(self.dataset))
        try:
            self.val_prompts = [self.dataset.caption(i) for i in range(num_val)]
        except BadSample as error:
            raise ConfigError(f"a validation prompt cannot be read: {error}") from None
        self.val_seeds = list(range(num_val))

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
            prompts,
            batch_size=min(self.hparams.batch_size, len(self.val_prompts)),
            sampler=validation_sampler(self, prompts),
        )

    def validation_images(self) -> torch.Tensor:
        """The (N, 3, R, R) crops in [-1, 1] whose captions are the validation prompts."""
        return torch.stack([self.dataset[i]["pixel_values"] for i in range(len(self.val_prompts))])


class CocoCaptionsDataModule(FolderDataModule):
    """A COCO-style captions file with image paths (see CocoCaptionsDataset); its first captions
    validate and evaluate (the paper: the first 10K COCO val captions and their images).

    Args:
        captions_file: COCO captions JSON.
        image_root: folder of the images it names.
        max_captions: keep the first this many captions (None: all).
        Others: as FolderDataModule.
    """

    def __init__(
        self,
        captions_file: str,
        image_root: str,
        resolution: int = 1024,
        batch_size: int = 4,
        num_workers: int = 4,
        num_val_prompts: int = 8,
        seed: int = 0,
        max_captions: int | None = None,
        filters: dict | None = None,
    ) -> None:
        super().__init__(
            root=None, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
            num_val_prompts=num_val_prompts, seed=seed,
            dataset=CocoCaptionsDataset(captions_file, image_root, resolution, max_captions), filters=filters,
        )


class ManifestDataModule(FolderDataModule):
    """A CSV or parquet manifest of image paths and captions (see ManifestDataset); its first
    captions validate.

    Args:
        manifest: the manifest file.
        image_column, caption_column: its path and caption columns.
        image_root: folder relative paths start from (None: the manifest's folder).
        Others: as FolderDataModule.
    """

    def __init__(
        self,
        manifest: str,
        resolution: int = 1024,
        batch_size: int = 4,
        num_workers: int = 4,
        num_val_prompts: int = 8,
        seed: int = 0,
        image_column: str = "image",
        caption_column: str = "caption",
        image_root: str | None = None,
        filters: dict | None = None,
    ) -> None:
        dataset = ManifestDataset(manifest, resolution, image_column, caption_column, image_root)
        super().__init__(
            root=None, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
            num_val_prompts=num_val_prompts, seed=seed, dataset=dataset, filters=filters,
        )


class WebDatasetDataModule(FolderDataModule):
    """img2dataset's tar shards (see data/shards.py: ShardDataset); the first samples' captions validate.

    Args:
        shards: a brace pattern or list of local tar files, e.g. '/data/laion/{00000..01023}.tar'.
        Others: as FolderDataModule.
    """

    def __init__(
        self,
        shards: str | list[str],
        resolution: int = 1024,
        batch_size: int = 4,
        num_workers: int = 4,
        num_val_prompts: int = 8,
        seed: int = 0,
        filters: dict | None = None,
    ) -> None:
        super().__init__(
            root=None, resolution=resolution, batch_size=batch_size, num_workers=num_workers,
            num_val_prompts=num_val_prompts, seed=seed, dataset=ShardDataset(shards, resolution), filters=filters,
        )
