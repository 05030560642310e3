"""COCO-style captions data: file order, crops, validation prompts, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lightning_sdxl.config_checks import ConfigError, validate_config
from lightning_sdxl.data import CocoCaptionsDataModule, CocoCaptionsDataset


@pytest.fixture
def coco(tmp_path):
    images = tmp_path / "val2014"
    images.mkdir()
    for index, (size, colour) in enumerate((((80, 60), "red"), ((60, 90), "blue"))):
        Image.new("RGB", size, colour).save(images / f"COCO_{index}.jpg")
    captions = {
        "images": [{"id": 7, "file_name": "COCO_0.jpg"}, {"id": 9, "file_name": "COCO_1.jpg"}],
        "annotations": [
            {"image_id": 9, "caption": " A blue wall. "},
            {"image_id": 7, "caption": "A red wall."},
            {"image_id": 9, "caption": "Blue paint."},
        ],
    }
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    return tmp_path / "captions.json", images


def test_captions_in_file_order_with_their_images(coco):
    captions_file, images = coco
    dataset = CocoCaptionsDataset(captions_file, images, resolution=32, max_captions=2)
    assert len(dataset) == 2 and [dataset.caption(i) for i in range(2)] == ["A blue wall.", "A red wall."]
    item = dataset[0]
    assert item["prompt"] == "A blue wall." and item["pixel_values"].shape == (3, 32, 32)
    assert item["original_size"].tolist() == [90, 60]
    assert torch.allclose(item["pixel_values"][:, 0, 0], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)  # blue (JPEG)


def test_datamodule_validation_prompts_and_images(coco):
    captions_file, images = coco
    data = CocoCaptionsDataModule(str(captions_file), str(images), resolution=32, batch_size=2, num_val_prompts=3)
    assert data.val_prompts == ["A blue wall.", "A red wall.", "Blue paint."]
    assert data.validation_images().shape == (3, 3, 32, 32)
    assert next(iter(data.train_dataloader()))["pixel_values"].shape == (2, 3, 32, 32)


def test_missing_files_are_clear_errors(coco, tmp_path):
    captions_file, images = coco
    (images / "COCO_1.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="2 images named in .* are not under data.image_root"):
        CocoCaptionsDataset(captions_file, images, resolution=32)
    with pytest.raises(FileNotFoundError, match="data.captions_file=/nowhere.json does not exist"):
        CocoCaptionsDataset("/nowhere.json", images, resolution=32)


def test_config_checks_name_unset_and_missing_paths(make_config, coco):
    with pytest.raises(ConfigError, match="data.captions_file is not set"):
        validate_config(make_config("data=coco"))
    captions_file, _ = coco
    with pytest.raises(ConfigError, match="data.image_root=/nowhere does not exist"):
        validate_config(make_config("data=coco", f"data.captions_file={captions_file}", "data.image_root=/nowhere"))
