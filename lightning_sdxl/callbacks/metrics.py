"""FID-Whole, FID-Patch and CLIP score of the student at validation (METHOD.md 6), on the
trainer's device and under DDP (torchmetrics synchronises the states; each rank scores the
prompts of its own validation shard)."""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch

from lightning_sdxl.metrics import (
    CLIPScore,
    FIDPatch,
    FIDWhole,
    ReferenceStatsCache,
    prepare_reference,
)
from lightning_sdxl.metrics.fid import check_patch_fits
from lightning_sdxl.metrics.reference_stats import reference_id


class DistillationMetrics(L.Callback):
    """Scores the student's validation images; logs `val/fid_whole`, `val/fid_patch`, `val/clip_score`.

    Reference statistics (FID's real side) come from the data module's `validation_images()`,
    computed once and cached on disk under `cache_dir`, keyed by the reference set, the extractor
    and the crop. The metrics live on this callback, not on the module, so their networks never
    enter checkpoints. Missing metric weights fail at construction, before training starts.

    Args:
        fid_whole: FID on images resized to the extractor's input, or None.
        fid_patch: FID on native-resolution centre crops, or None.
        clip_score: OpenCLIP score x 100, or None.
        cache_dir: folder of cached reference statistics.
        reference_batch_size: images per extractor call when computing reference statistics.
    """

    def __init__(
        self,
        fid_whole: FIDWhole | None = None,
        fid_patch: FIDPatch | None = None,
        clip_score: CLIPScore | None = None,
        cache_dir: str = "reference_stats",
        reference_batch_size: int = 32,
    ):
        self.fids = {name: fid for name, fid in (("fid_whole", fid_whole), ("fid_patch", fid_patch)) if fid}
        self.clip_score = clip_score
        self.cache = ReferenceStatsCache(cache_dir)
        self.reference_batch_size = reference_batch_size
        self._prepared: set[str] = set()

    def _metrics(self) -> list[torch.nn.Module]:
        return list(self.fids.values()) + ([self.clip_score] if self.clip_score is not None else [])

    def _reference_images(self, trainer: L.Trainer) -> Iterator[torch.Tensor]:
        images = trainer.datamodule.validation_images()[trainer.global_rank :: trainer.world_size]
        for start in range(0, len(images), self.reference_batch_size):
            yield (images[start : start + self.reference_batch_size] + 1) / 2  # [-1, 1] -> [0, 1]

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        check_patch_fits(self.fids.get("fid_patch"), pl_module.hparams.resolution)  # before any step

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for metric in self._metrics():
            metric.to(pl_module.device)
            metric.reset()  # the generated side; reference statistics are kept
        identity = reference_id(trainer.datamodule)
        for name, fid in self.fids.items():
            if name not in self._prepared:
                prepare_reference(fid, identity, lambda: self._reference_images(trainer), self.cache)
                self._prepared.add(name)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        student = pl_module.validation_outputs[-1]["student"]  # (B, 3, R, R) in [0, 1]
        for fid in self.fids.values():
            fid.update(student, real=False)
        if self.clip_score is not None:
            self.clip_score.update(student, batch["prompt"])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        values = {f"val/{name}": fid.compute() for name, fid in self.fids.items()}
        if self.clip_score is not None:
            values["val/clip_score"] = self.clip_score.compute()
        for name, value in values.items():
            pl_module.log(name, value.float())  # already reduced across ranks by torchmetrics

