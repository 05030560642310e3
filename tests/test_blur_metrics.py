"""The metrics that can see blur (issue 10): high-frequency energy ratio, precision and recall,
each against an independent computation."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from lightning_sdxl.metrics.precision_recall import PrecisionRecall
from lightning_sdxl.metrics.sharpness import HighFrequencyRatio, laplacian_energy


def numpy_laplacian_energy(image: np.ndarray) -> float:
    grey = image.mean(axis=0)
    h, w = grey.shape
    total = [
        (grey[i - 1, j] + grey[i + 1, j] + grey[i, j - 1] + grey[i, j + 1] - 4 * grey[i, j]) ** 2
        for i in range(1, h - 1)
        for j in range(1, w - 1)
    ]
    return float(np.mean(total))


def test_laplacian_energy_matches_a_loop_and_falls_with_blur():
    images = torch.rand(3, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    expected = [numpy_laplacian_energy(image.numpy().astype(np.float64)) for image in images]
    assert np.allclose(laplacian_energy(images).numpy(), expected, rtol=1e-5)
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1)
    ratio = HighFrequencyRatio()
    ratio.update(blurred, images)
    expected_ratio = sum(numpy_laplacian_energy(b.numpy()) for b in blurred) / sum(expected)
    assert abs(ratio.compute().item() - expected_ratio) < 1e-5 and expected_ratio < 0.5
    same = HighFrequencyRatio()
    same.update(images, images)
    assert same.compute().item() == 1.0


class Identity(nn.Module):
    """Stands in for an FID: features are the flattened image."""

    def extractor(self, images):
        return images.flatten(1)

    def prepare(self, images):
        return images


def brute_force_precision_recall(fake: np.ndarray, real: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.linalg.norm(x[:, None] - x[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # k-th neighbour, itself excluded (distance 0 first)

    cross = np.linalg.norm(fake[:, None] - real[None], axis=-1)  # (F, R)
    precision = np.mean([(cross[i] <= radii(real)).any() for i in range(len(fake))])
    recall = np.mean([(cross[:, j] <= radii(fake)).any() for j in range(len(real))])
    return float(precision), float(recall)


def test_precision_recall_matches_brute_force_knn():
    generator = torch.Generator().manual_seed(1)
    real = torch.rand(40, 3, 2, 2, generator=generator)
    fake = torch.rand(30, 3, 2, 2, generator=generator) * 0.8  # covers part of the reference
    metric = PrecisionRecall(Identity(), neighborhood=3)
    metric.update(real, real=True)
    metric.update(fake[:15], real=False)
    metric.update(fake[15:], real=False)
    precision, recall = metric.compute()
    expected = brute_force_precision_recall(fake.flatten(1).double().numpy(), real.flatten(1).double().numpy(), 3)
    assert abs(precision.item() - expected[0]) < 1e-6 and abs(recall.item() - expected[1]) < 1e-6
    assert 0 < expected[1] < expected[0] < 1  # the narrower fakes lie inside, but do not cover, the references
