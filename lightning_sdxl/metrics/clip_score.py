"""CLIP score (METHOD.md 6): mean of 100 x cos(image, prompt) under OpenCLIP, clamped at 0.

The convention is torchmetrics' `CLIPScore` (sum of per-pair scores over samples; `compute`
returns max(mean, 0)); the model is an `OpenCLIPScorer` loaded from local files instead of the
hub's transformers CLIP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from lightning_sdxl.metrics.features import OpenCLIPScorer


class CLIPScore(Metric):
    """Image-prompt CLIP score, summed over ranks by torchmetrics.

    Args:
        scorer: the OpenCLIP model (e.g. `OpenCLIPScorer("ViT-g-14", "laion2b_s34b_b88k")`).
        kwargs: torchmetrics `Metric` arguments.
    """

    higher_is_better = True
    is_differentiable = False
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 100.0

    score_sum: Tensor
    num_samples: Tensor

    def __init__(self, scorer: OpenCLIPScorer, **kwargs):
        super().__init__(**kwargs)
        self.scorer = scorer
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", torch.tensor(0), dist_reduce_fx="sum")

    def update(self, images: Tensor, prompts: Sequence[str]) -> None:
        """Add a batch: images (B, 3, H, W) in [0, 1] and their B prompts."""
        with torch.no_grad():
            scores = self.scorer(images, prompts)  # (B,)
        self.score_sum += scores.double().sum()
        self.num_samples += scores.shape[0]

    def compute(self) -> Tensor:
        return (self.score_sum / self.num_samples).clamp(min=0).float()
