"""Precision and recall of generated images against references (Kynkaanniemi et al. 2019) on the
FID-Whole view and feature network: precision = share of generated samples inside the references'
k-NN manifold (fidelity), recall = share of references inside the generated one (coverage). A
model that averages several sharp outcomes into one blurred image loses precision; one that
collapses to few modes loses recall. The k-NN maths is torch-fidelity's."""

from __future__ import annotations

import torch
from torch import Tensor
from torch_fidelity.metric_prc import calculate_precision_recall_full
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from lightning_sdxl.metrics.fid import FrechetDistance


class PrecisionRecall(Metric):
    """Collects features of reference and generated images; `compute` returns (precision, recall).

    Args:
        fid: the FID whose extractor and image view to use (e.g. FID-Whole); it is not updated.
        neighborhood: k of the k-NN radii (torch-fidelity's default, 3).
    """

    full_state_update = False

    def __init__(self, fid: FrechetDistance, neighborhood: int = 3, **kwargs):
        super().__init__(**kwargs)
        self.fid = fid
        self.neighborhood = neighborhood
        self.add_state("real_features", default=[], dist_reduce_fx="cat")
        self.add_state("fake_features", default=[], dist_reduce_fx="cat")

    @torch.no_grad()
    def update(self, images: Tensor, real: bool) -> None:
        """images: (B, 3, H, W) in [0, 1]."""
        features = self.fid.extractor(self.fid.prepare(images.clamp(0, 1))).double()  # (B, d)
        (self.real_features if real else self.fake_features).append(features)

    def compute(self) -> tuple[Tensor, Tensor]:
        real, fake = dim_zero_cat(self.real_features), dim_zero_cat(self.fake_features)
        if min(len(real), len(fake)) <= self.neighborhood:
            raise ValueError(f"precision/recall with k={self.neighborhood} needs more than k images on each side")
        # torch-fidelity's order: features_1 generated, features_2 reference.
        precision, recall = calculate_precision_recall_full(fake, real, self.neighborhood)
        return torch.as_tensor(precision), torch.as_tensor(recall)
