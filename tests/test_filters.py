"""data.filters: the paper's kind of data filters, counted as they drop samples (issue 14)."""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from lightning_sdxl.data.datamodules import FolderDataModule
from lightning_sdxl.data.filters import clean_caption, laplacian_variance


def test_clean_caption_strips_urls_and_html():
    assert clean_caption("A <b>red</b> wall https://x.example/a?b=1 &amp; sky  www.y.org") == "A red wall & sky"
    assert clean_caption("<img src=x> http://only.url") == ""


def test_laplacian_variance_sees_blur():
    checks = np.indices((32, 32)).sum(0) % 2 * 255
    sharp = Image.fromarray(checks.astype(np.uint8))
    assert laplacian_variance(sharp) > 1000 > laplacian_variance(Image.new("L", (32, 32), 128)) == 0.0


def write(path, size, caption, noise=True):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) if noise else np.full(
        (size[1], size[0], 3), 128, np.uint8)
    Image.fromarray(pixels).save(path)
    path.with_suffix(".txt").write_text(caption)


def test_filters_drop_and_count_small_blurred_and_empty_caption_samples(tmp_path, caplog):
    write(tmp_path / "a_good.png", (64, 48), "a sharp photo")
    write(tmp_path / "b_small.png", (30, 20), "a small photo")
    write(tmp_path / "c_flat.png", (64, 64), "a flat photo", noise=False)
    write(tmp_path / "d_url.png", (64, 64), "https://example.com/d.png")
    write(tmp_path / "e_good.png", (64, 64), "another <i>sharp</i> photo")
    data = FolderDataModule(str(tmp_path), resolution=16, batch_size=1, num_workers=0,
                            filters={"min_side": 40, "min_sharpness": 10.0, "clean_captions": True})
    with caplog.at_level(logging.INFO, logger="lightning_sdxl.data.filters"):
        prompts = [data.dataset[i]["prompt"] for i in range(len(data.dataset))]
    # Each dropped index gives the next kept item; the cleaned caption is what trains.
    assert prompts == ["a sharp photo", "another sharp photo", "another sharp photo", "another sharp photo",
                       "another sharp photo"]
    # Counted per read: index 1 reads b, c, d (dropped) then e; index 2 reads c, d; index 3 reads d.
    assert dict(data.dataset.filters.dropped) == {"min_side": 1, "min_sharpness": 2, "empty_caption": 3}
    assert "dropped 1 samples by min_side" in caplog.text


def test_default_filters_keep_every_readable_sample(tmp_path):
    write(tmp_path / "small.png", (8, 8), "a tiny photo", noise=False)
    data = FolderDataModule(str(tmp_path), resolution=16, batch_size=1, num_workers=0)
    assert data.dataset[0]["prompt"] == "a tiny photo" and not data.dataset.filters.dropped
