"""Evaluation metrics (METHOD.md 6): FID-Whole, FID-Patch and CLIP score, from local weights only."""

from lightning_sdxl.metrics.clip_score import CLIPScore
from lightning_sdxl.metrics.features import (
    FeatureExtractor,
    InceptionFeatures,
    LocalFeatures,
    MissingMetricWeights,
    OpenCLIPScorer,
)
from lightning_sdxl.metrics.fid import FIDPatch, FIDWhole, FrechetDistance, ReferenceStats
from lightning_sdxl.metrics.reference_stats import (
    ReferenceStatsCache,
    prepare_reference,
    reference_key,
)

__all__ = [
    "CLIPScore",
    "FIDPatch",
    "FIDWhole",
    "FeatureExtractor",
    "FrechetDistance",
    "InceptionFeatures",
    "LocalFeatures",
    "MissingMetricWeights",
    "OpenCLIPScorer",
    "ReferenceStats",
    "ReferenceStatsCache",
    "prepare_reference",
    "reference_key",
]
