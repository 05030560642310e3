"""The paper's data filters as config (issue 14): a minimum image side, a minimum sharpness, and
caption cleaning, each counted as it drops samples (METHOD.md: the paper distils on filtered LAION
and COYO subsets; it names resolution and quality filters without thresholds, so the defaults keep
everything and a real run sets them, e.g. `data.filters.min_side=1024`).

A dropped sample raises `Filtered` (a BadSample), so the datasets' skip-to-the-next-item rule
serves filters and unreadable files alike; filters are counted, not logged one by one.
"""

from __future__ import annotations

import html
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from lightning_sdxl.data.bad_samples import BadSample

log = logging.getLogger(__name__)
URL = re.compile(r"(https?://|www\.)\S+", re.IGNORECASE)
HTML_TAG = re.compile(r"<[^>]{1,200}>")
SPACES = re.compile(r"\s+")
AESTHETIC_KEYS = ("aesthetic", "aesthetic_score", "AESTHETIC_SCORE")  # img2dataset metadata from LAION


class Filtered(BadSample):
    """A readable sample a data filter drops; `reason` names the filter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def clean_caption(text: str) -> str:
    """The caption without URLs and HTML tags (entities decoded), whitespace collapsed."""
    text = HTML_TAG.sub(" ", html.unescape(URL.sub(" ", text)))
    return SPACES.sub(" ", text).strip()


def laplacian_variance(image: Image.Image) -> float:
    """Variance of the 4-neighbour Laplacian of the grey image (0-255): low for blurred images."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    if min(grey.shape) < 3:
        return 0.0
    laplacian = grey[1:-1, :-2] + grey[1:-1, 2:] + grey[:-2, 1:-1] + grey[2:, 1:-1] - 4 * grey[1:-1, 1:-1]
    return float(laplacian.var())


@dataclass
class SampleFilters:
    """Args:
        min_side: drop images whose shorter side is below this (0: keep all; the paper's runs: 1024).
        min_sharpness: drop images whose `laplacian_variance` is below this (0: keep all).
        clean_captions: strip URLs and HTML from captions and drop captions left empty.
        min_aesthetic: drop samples whose metadata (a shard's `<key>.json`) gives an aesthetic score
            below this (LAION's `aesthetic`, `aesthetic_score` or `AESTHETIC_SCORE`); samples
            without a score are kept (0: keep all).
    """

    min_side: int = 0
    min_sharpness: float = 0.0
    clean_captions: bool = True
    min_aesthetic: float = 0.0
    dropped: Counter = field(default_factory=Counter)  # reason -> samples dropped in this process

    def caption(self, text: str, where: object) -> str:
        cleaned = clean_caption(text) if self.clean_captions else text.strip()
        if not cleaned:
            self._drop("empty_caption", f"{where}: the caption is empty after cleaning ({text[:60]!r})")
        return cleaned

    def image(self, image: Image.Image, where: object) -> None:
        if min(image.size) < self.min_side:
            self._drop("min_side", f"{where}: {image.size[0]} x {image.size[1]} is below data.filters.min_side={self.min_side}")
        if self.min_sharpness > 0:
            sharpness = laplacian_variance(image)
            if sharpness < self.min_sharpness:
                self._drop("min_sharpness", f"{where}: Laplacian variance {sharpness:.1f} is below "
                           f"data.filters.min_sharpness={self.min_sharpness}")

    def metadata(self, meta: dict, where: object) -> None:
        if self.min_aesthetic <= 0:
            return
        score = next((meta[key] for key in AESTHETIC_KEYS if meta.get(key) is not None), None)
        if score is not None and float(score) < self.min_aesthetic:
            self._drop("min_aesthetic", f"{where}: aesthetic score {float(score):.2f} is below "
                       f"data.filters.min_aesthetic={self.min_aesthetic}")

    def _drop(self, reason: str, message: str) -> None:
        self.dropped[reason] += 1
        count = self.dropped[reason]
        if count == 10 ** int(math.log10(count)):  # 1, 10, 100, ...: a count, not a line per sample
            log.info("data.filters dropped %d samples by %s so far in this process (latest: %s)", count, reason, message)
        raise Filtered(reason, message)
