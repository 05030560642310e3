"""data=manifest: a CSV or parquet of image paths and captions (issue 14's second source)."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image

from lightning_sdxl.data import ManifestDataModule
from lightning_sdxl.data.manifest import ManifestDataset
from lightning_sdxl.errors import ConfigError


@pytest.fixture
def manifest(tmp_path):
    (tmp_path / "images").mkdir()
    for name, colour in (("red.png", "red"), ("blue.jpg", "blue")):
        Image.new("RGB", (48, 32), colour).save(tmp_path / "images" / name)
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (32, 32), "green").save(outside)
    (tmp_path / "train.csv").write_text(
        "path,text,score\n"
        "images/red.png,a red wall,5.1\n"
        f"{outside},a green wall,4.0\n"      # an absolute path
        "images/blue.jpg,,3.0\n"             # no caption: dropped at indexing
        "images/missing.png,a lost wall,2.0\n"  # not on disk: skipped when read, named in the log
    )
    return tmp_path / "train.csv"


def test_rows_paths_and_captions(manifest, caplog):
    dataset = ManifestDataset(manifest, resolution=16, image_column="path", caption_column="text")
    assert len(dataset) == 3 and dataset.dropped == 1
    assert [dataset.caption(i) for i in range(3)] == ["a red wall", "a green wall", "a lost wall"]
    red, green = dataset[0], dataset[1]
    assert red["original_size"].tolist() == [32, 48] and green["prompt"] == "a green wall"
    assert torch.allclose(red["pixel_values"][:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    with caplog.at_level(logging.WARNING):
        lost = dataset[2]  # missing file: the next row (wrapping) takes its place
    assert lost["prompt"] == "a red wall" and "missing.png" in caplog.text


def test_datamodule_batches_and_validation_prompts(manifest):
    data = ManifestDataModule(str(manifest), resolution=16, batch_size=2, num_workers=0, num_val_prompts=2,
                              image_column="path", caption_column="text")
    assert data.val_prompts == ["a red wall", "a green wall"]
    assert next(iter(data.train_dataloader()))["pixel_values"].shape == (2, 3, 16, 16)


def test_wrong_columns_and_missing_files_are_one_line_errors(manifest, tmp_path):
    with pytest.raises(ConfigError, match=r"has columns \['path', 'text', 'score'\]; name .* data.image_column="):
        ManifestDataset(manifest, resolution=16)  # defaults: image, caption
    with pytest.raises(FileNotFoundError, match="data.manifest=.*nowhere.csv does not exist"):
        ManifestDataset(tmp_path / "nowhere.csv", resolution=16)
    (tmp_path / "latin1.csv").write_bytes("image,caption\nx.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not a readable UTF-8 CSV"):
        ManifestDataset(tmp_path / "latin1.csv", resolution=16)


def test_parquet_reads_with_pyarrow_or_names_the_install(manifest, tmp_path):
    try:
        import pyarrow as arrow
        from pyarrow import parquet
    except ImportError:  # not a project dependency: the manifest says what to install
        (tmp_path / "train.parquet").write_bytes(b"PAR1")
        with pytest.raises(ConfigError, match="pip install pyarrow"):
            ManifestDataset(tmp_path / "train.parquet", resolution=16)
        return
    table = arrow.table({"image": ["images/red.png"], "caption": ["a red wall"]})
    parquet.write_table(table, tmp_path / "train.parquet")
    assert ManifestDataset(tmp_path / "train.parquet", resolution=16)[0]["prompt"] == "a red wall"
