"""On-disk cache of FID reference statistics, keyed by everything that defines them.

The key hashes the reference set's identity (a string the caller supplies, e.g.
"toy_world:seed=0:n=2048:res=128" or a folder + file list + mtimes), the extractor's identity
(name + weights SHA-256) and the image view (whole/patch and the resize/crop size). A file holds
torchmetrics' float64 running sums, so a cached FID equals the uncached one exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from lightning_sdxl.io import atomic_path
from lightning_sdxl.metrics.fid import FrechetDistance, ReferenceStats

CACHE_FORMAT = 1

# Data-module settings that change which reference images exist (batching does not).
_REFERENCE_IGNORED = ("batch_size", "num_workers")


def reference_id(datamodule) -> str:
    """What defines the reference set: the data module's class and data settings."""
    settings = {k: v for k, v in dict(datamodule.hparams).items() if k not in _REFERENCE_IGNORED}
    dataset = getattr(datamodule, "dataset", None)
    if dataset is not None and hasattr(dataset, "images"):  # a folder: its file list and dates
        files = [(str(path), path.stat().st_mtime_ns) for path in dataset.images]
        settings["files"] = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:16]
    return f"{type(datamodule).__name__}:{json.dumps(settings, sort_keys=True, default=str)}"


def reference_description(metric: FrechetDistance, reference_id: str) -> dict[str, str]:
    """What defines a metric's reference statistics (hashed into the cache key)."""
    return {
        "format": str(CACHE_FORMAT),
        "reference": reference_id,
        "extractor": metric.extractor.identity,
        "view": metric.view,
    }


def reference_key(metric: FrechetDistance, reference_id: str) -> str:
    """Hex SHA-256 of `reference_description`."""
    description = json.dumps(reference_description(metric, reference_id), sort_keys=True)
    return hashlib.sha256(description.encode()).hexdigest()


class ReferenceStatsCache:
    """A folder of `<mode>-<key>.safetensors` files, written atomically.

    Args:
        dirpath: the cache folder (created on the first save).
    """

    def __init__(self, dirpath: str | os.PathLike):
        self.dirpath = Path(dirpath)

    def path(self, metric: FrechetDistance, reference_id: str) -> Path:
        return (
            self.dirpath / f"{metric.mode}-{reference_key(metric, reference_id)[:32]}.safetensors"
        )

    def load(self, metric: FrechetDistance, reference_id: str) -> ReferenceStats | None:
        """The cached statistics, or None if there are none for this key."""
        path = self.path(metric, reference_id)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="pt") as handle:
            if handle.metadata() != reference_description(metric, reference_id):
                return None  # a (truncated) hash collision: recompute
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not iterable)
        return ReferenceStats(
            tensors["features_sum"], tensors["features_cov_sum"], int(tensors["num_samples"])
        )

    def save(self, metric: FrechetDistance, reference_id: str, stats: ReferenceStats) -> Path:
        path = self.path(metric, reference_id)
        tensors = {
            "features_sum": stats.features_sum.to(torch.float64).contiguous(),
            "features_cov_sum": stats.features_cov_sum.to(torch.float64).contiguous(),
            "num_samples": torch.tensor(stats.num_samples, dtype=torch.int64),
        }
        with atomic_path(path) as temporary:
            save_file(tensors, str(temporary), metadata=reference_description(metric, reference_id))
        return path


def _on_every_rank(flag: bool, device: torch.device) -> bool:
    """True only if `flag` holds on every rank (all ranks take the same branch)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value)


def prepare_reference(
    metric: FrechetDistance,
    reference_id: str,
    images: Callable[[], Iterable[Tensor]],
    cache: ReferenceStatsCache,
) -> bool:
    """Fill `metric`'s reference side from the cache, or compute it from `images` and cache it.

    Under torch.distributed every rank calls this; `images()` yields this rank's share of the
    reference set (float (B, 3, H, W) in [0, 1]), and rank 0 writes the file.

    Args:
        metric: an FIDWhole or FIDPatch.
        reference_id: identity of the reference set (see the module docstring).
        images: called only on a cache miss.
        cache: where the statistics live.

    Returns:
        True if the statistics came from the cache.
    """
    stats = cache.load(metric, reference_id)
    if _on_every_rank(stats is not None, metric.device):
        metric.load_reference_stats(stats)
        return True
    metric.load_reference_stats(
        ReferenceStats(
            torch.zeros(metric.extractor.num_features, dtype=torch.float64),
            torch.zeros(
                metric.extractor.num_features, metric.extractor.num_features, dtype=torch.float64
            ),
            0,
        )
    )
    with torch.no_grad():
        for batch in images():
            metric.update(batch.to(metric.device), real=True)
    stats = metric.reference_stats()
    if stats.num_samples < 2:
        raise ValueError(
            f"reference set {reference_id!r} gave {stats.num_samples} images; FID needs at least 2"
        )
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        cache.save(metric, reference_id, stats)
    return False
