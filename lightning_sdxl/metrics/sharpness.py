"""Sharpness: the high-frequency energy of images, and its ratio between two models on the same
prompts and seeds (1.0 = as sharp as the reference). A one-step regression onto several sharp
outcomes averages them, which removes exactly this energy (the blur the paper's FID-Patch targets,
METHOD.md 6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

# The discrete 4-neighbour Laplacian: zero on flat regions and linear ramps.
_LAPLACIAN = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])


def laplacian_energy(images: Tensor) -> Tensor:
    """Per-image mean squared Laplacian of the grey level, (B, 3, H, W) in [0, 1] -> (B,).

    Valid convolution (no padding), so borders add nothing; grey = the channel mean.
    """
    grey = images.float().mean(dim=1, keepdim=True)  # (B, 1, H, W)
    kernel = _LAPLACIAN.to(grey.device).view(1, 1, 3, 3)
    return F.conv2d(grey, kernel).pow(2).mean(dim=(1, 2, 3))  # (B,)


class HighFrequencyRatio(Metric):
    """sum of `laplacian_energy` over the images / the same over their references.

    `update(images, references)` takes pairs generated from the same prompts and seeds (a student
    and its teacher); sums are added across ranks at `compute`.
    """

    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("energy", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("reference_energy", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, images: Tensor, references: Tensor) -> None:
        if images.shape != references.shape:
            raise ValueError(f"images {tuple(images.shape)} and references {tuple(references.shape)} must pair up")
        self.energy += laplacian_energy(images).double().sum()
        self.reference_energy += laplacian_energy(references).double().sum()

    def compute(self) -> Tensor:
        return self.energy / self.reference_energy
