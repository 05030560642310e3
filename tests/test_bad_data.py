"""Bad data never kills a run silently or with a traceback (issue 15): unreadable samples are
skipped with a log line naming the file; malformed captions files and too little data are one-line
errors before any model loads; paths stay inside their root; extreme aspect ratios stay cheap."""

from __future__ import annotations

import json
import logging

import pytest
from PIL import Image

from lightning_sdxl.data.coco import CocoCaptionsDataset
from lightning_sdxl.data.datamodules import FolderDataModule
from lightning_sdxl.data.folder import FolderDataset
from lightning_sdxl.errors import ConfigError


def image(path, size=(40, 30), colour="red", caption="a red wall"):
    Image.new("RGB", size, colour).save(path)
    path.with_suffix(".txt").write_text(caption)


def test_truncated_empty_fake_and_non_utf8_samples_are_skipped_and_named(tmp_path, caplog):
    image(tmp_path / "a_good.png")
    image(tmp_path / "b_truncated.jpg", colour="blue")
    data = (tmp_path / "b_truncated.jpg").read_bytes()
    (tmp_path / "b_truncated.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "c_empty.png").write_bytes(b"")
    (tmp_path / "c_empty.txt").write_text("empty")
    (tmp_path / "d_text.jpg").write_text("not an image")
    (tmp_path / "d_text.txt").write_text("text")
    image(tmp_path / "e_latin1.png")
    (tmp_path / "e_latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    image(tmp_path / "f_good.png", colour="green", caption="a green wall")
    dataset = FolderDataset(tmp_path, resolution=16)
    with caplog.at_level(logging.WARNING, logger="lightning_sdxl.data.folder"):
        items = [dataset[i] for i in range(len(dataset))]
    # Each bad index gives the next readable item instead; every bad file is named once per visit.
    assert [item["prompt"] for item in items] == ["a red wall"] + ["a green wall"] * 5
    logged = caplog.text
    for name in ("b_truncated.jpg", "c_empty.png", "d_text.jpg", "e_latin1.txt"):
        assert name in logged, name
    assert "not UTF-8" in logged


def test_fewer_images_than_a_batch_is_refused_at_once(tmp_path):
    image(tmp_path / "only.png")
    with pytest.raises(ConfigError, match="holds 1 images, fewer than one batch .data.batch_size=4"):
        FolderDataModule(str(tmp_path), resolution=16, batch_size=4, num_workers=0)


def test_a_non_utf8_validation_caption_is_a_config_error(tmp_path):
    image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes(b"\xff\xfe")
    image(tmp_path / "b.png")
    with pytest.raises(ConfigError, match="validation prompt .*a.txt.*not UTF-8"):
        FolderDataModule(str(tmp_path), resolution=16, batch_size=1, num_workers=0)


def test_extreme_aspect_ratio_is_cropped_before_resizing(tmp_path):
    image(tmp_path / "strip.png", size=(4000, 4))
    item = FolderDataset(tmp_path, resolution=64)[0]  # without the pre-crop: a 64 x 64,000 intermediate
    assert item["pixel_values"].shape == (3, 64, 64)
    assert item["original_size"].tolist() == [4, 4000]  # micro-conditioning keeps the source size


COCO_CASES = [
    ("{not json", "is not valid UTF-8 JSON"),
    (json.dumps({"annotations": []}), "lacks an \"images\" or \"annotations\" list"),
    (json.dumps({"images": [{"id": 1}], "annotations": []}), "without id or file_name .images.0.."),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 2, "caption": "x"}]}),
     "annotations.0. whose image_id is not among its images"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": None}]}),
     "annotations.0. without a caption"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}), "has no annotations"),
    (json.dumps({"images": [{"id": 1, "file_name": "/etc/hostname"}], "annotations": [{"image_id": 1, "caption": "x"}]}),
     "outside data.image_root"),
    (json.dumps({"images": [{"id": 1, "file_name": "../secret.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}]}),
     "outside data.image_root"),
]


@pytest.mark.parametrize(("text", "message"), COCO_CASES, ids=[m for _, m in COCO_CASES])
def test_malformed_coco_files_are_one_line_errors(text, message, tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "captions.json").write_text(text)
    with pytest.raises(ConfigError, match=message) as raised:
        CocoCaptionsDataset(tmp_path / "captions.json", tmp_path / "images", resolution=16)
    assert "\n" not in str(raised.value)
