"""FID-Whole and FID-Patch (METHOD.md 6) on torchmetrics' FrechetInceptionDistance.

Both feed a `FeatureExtractor` (features.py) and differ only in the view of each image:
FID-Whole resizes the whole image to the extractor's input size (bilinear, antialias); FID-Patch
takes the centre crop of that size at native resolution, no resize (299 px out of 1024 px on real
runs), and raises if an image is smaller than the crop. torchmetrics keeps the running sums
(`real_features_sum`, `real_features_cov_sum`, `real_features_num_samples` and the `fake_`
ones, float64) and sums them across ranks at `compute`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.image.fid import FrechetInceptionDistance

from lightning_sdxl.errors import ConfigError
from lightning_sdxl.metrics.features import FeatureExtractor


@dataclass(frozen=True)
class ReferenceStats:
    """The reference side of an FID: torchmetrics' running sums over the reference features.

    Attributes:
        features_sum: (d,) float64 sum of the features.
        features_cov_sum: (d, d) float64 sum of the outer products (features^T features).
        num_samples: number of reference images.
    """

    features_sum: Tensor
    features_cov_sum: Tensor
    num_samples: int

    @property
    def mean(self) -> Tensor:
        return self.features_sum / self.num_samples  # (d,)

    @property
    def cov(self) -> Tensor:
        """Unbiased covariance (d, d), as torchmetrics computes it."""
        mean = self.mean[None]  # (1, d)
        return (self.features_cov_sum - self.num_samples * mean.T @ mean) / (self.num_samples - 1)


class FrechetDistance(FrechetInceptionDistance):
    """torchmetrics' FID on a given feature extractor and image view; see FIDWhole and FIDPatch.

    `update(images, real)` takes float images in [0, 1], (B, 3, H, W), at any size. Reference
    (real) statistics survive `reset()` by default: they are fixed while the generator changes.

    Args:
        extractor: the feature network (its `input_size` sets the resize or crop size).
        reset_real_features: whether `reset()` also clears the reference statistics.
        kwargs: torchmetrics `Metric` arguments (sync settings, process group).
    """

    mode: str

    def __init__(self, extractor: FeatureExtractor, reset_real_features: bool = False, **kwargs):
        super().__init__(
            feature=extractor, reset_real_features=reset_real_features, normalize=True, **kwargs
        )
        self.size = int(extractor.input_size)

    @property
    def extractor(self) -> FeatureExtractor:
        return self.inception

    @property
    def view(self) -> str:
        """What each image becomes before the extractor (part of the reference cache key)."""
        raise NotImplementedError

    def prepare(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, size, size), the extractor's input."""
        raise NotImplementedError

    def update(self, images: Tensor, real: bool) -> None:
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"expected float images (B, 3, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}"
            )
        low, high = images.aminmax()
        if low < -1e-3 or high > 1 + 1e-3:
            raise ValueError(
                f"expected images in [0, 1], got values in [{low:.3f}, {high:.3f}] (map [-1, 1] with (x + 1) / 2)"
            )
        super().update(self.prepare(images.clamp(0, 1)), real=real)

    def reference_stats(self) -> ReferenceStats:
        """The reference statistics accumulated so far, summed over all ranks."""
        with self.sync_context():
            return ReferenceStats(
                self.real_features_sum.detach().clone().cpu(),
                self.real_features_cov_sum.detach().clone().cpu(),
                int(self.real_features_num_samples),
            )

    def load_reference_stats(self, stats: ReferenceStats) -> None:
        """Set the reference side exactly to `stats` (replacing what was there).

        Under torch.distributed, rank 0 of the metric's process group holds them and the other
        ranks zeros, so torchmetrics' sum across ranks at `compute` reproduces them exactly.
        """
        if stats.features_sum.shape != (self.extractor.num_features,):
            raise ValueError(
                f"stats of width {stats.features_sum.shape[0]} for {self.extractor.num_features} features"
            )
        holder = (
            not (dist.is_available() and dist.is_initialized())
            or dist.get_rank(self.process_group) == 0
        )
        scale = 1.0 if holder else 0.0
        self.real_features_sum = stats.features_sum.to(self.device, torch.float64) * scale
        self.real_features_cov_sum = stats.features_cov_sum.to(self.device, torch.float64) * scale
        self.real_features_num_samples = torch.tensor(
            stats.num_samples if holder else 0, device=self.device
        )
        self._computed = None


class FIDWhole(FrechetDistance):
    """FID-Whole: whole images resized (bilinear, antialias) to the extractor's input size.

    Non-square images are squashed, as torchmetrics does.
    """

    mode = "whole"

    @property
    def view(self) -> str:
        return f"whole:resize={self.size}:bilinear-antialias"

    def prepare(self, images: Tensor) -> Tensor:
        if images.shape[-2:] == (self.size, self.size):
            return images
        resized = F.interpolate(
            images,
            size=(self.size, self.size),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        return resized.clamp(0, 1)  # (B, 3, size, size)


class FIDPatch(FrechetDistance):
    """FID-Patch (SDXL-Lightning, METHOD.md 6): the centre size x size crop at native resolution.

    The crop starts at ((H - size) // 2, (W - size) // 2); images smaller than the crop raise.
    """

    mode = "patch"

    @property
    def view(self) -> str:
        return f"patch:centre-crop={self.size}"

    def prepare(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        if height < self.size or width < self.size:
            raise ValueError(
                f"FID-Patch crops {self.size} x {self.size} pixels at native resolution but images are "
                f"{height} x {width}; use a feature extractor with a smaller input size"
            )
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return images[..., top : top + self.size, left : left + self.size]  # (B, 3, size, size)


def check_patch_fits(fid_patch: FIDPatch | None, resolution: int) -> None:
    """FID-Patch crops at native resolution: the images must be at least the extractor's input."""
    if fid_patch is not None and resolution < fid_patch.size:
        raise ConfigError(
            f"FID-Patch takes a {fid_patch.size} px native crop, but data.resolution={resolution}: "
            "raise the resolution or use a patch extractor with a smaller input."
        )
