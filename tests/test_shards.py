"""data=webdataset: img2dataset-style tar shards read by index, bad samples skipped and named,
every sample once over the ranks, brace patterns, and a short training run."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from lightning_sdxl.data.datamodules import WebDatasetDataModule
from lightning_sdxl.data.resumable import ResumableSampler
from lightning_sdxl.data.shards import ShardDataset, expand_shards
from lightning_sdxl.errors import MissingPathError
from lightning_sdxl.toy.write_shards import add_member as add


def image_bytes(colour, fmt="JPEG", size=(48, 40), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, fmt)
    return buffer.getvalue()


def write_shards(root: Path, shards: int = 2, per_shard: int = 4, stats: bool = True) -> None:
    """Shards as img2dataset writes them (<key>.jpg, .txt, .json and <shard>_stats.json)."""
    for s in range(shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tar:
            for k in range(per_shard):
                key = f"{s:05d}{k:04d}"
                add(tar, f"{key}.jpg", image_bytes((40 * k, 200, 10 * s)))
                add(tar, f"{key}.txt", f"a shape {s} {k}".encode())
                add(tar, f"{key}.json", json.dumps({"key": key}).encode())
        if stats:
            (root / f"{s:05d}_stats.json").write_text(json.dumps({"successes": per_shard}))


def test_shards_read_by_index_with_the_data_contract(tmp_path):
    write_shards(tmp_path)
    dataset = ShardDataset(str(tmp_path / "{00000..00001}.tar"), resolution=32)
    assert len(dataset) == 8
    item = dataset[5]
    assert item["pixel_values"].shape == (3, 32, 32) and item["prompt"] == "a shape 1 1"
    assert item["original_size"].tolist() == [40, 48]


def test_sample_counts_without_stats_files_come_from_the_tars(tmp_path):
    write_shards(tmp_path, stats=False, per_shard=3)
    assert len(ShardDataset([str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")], resolution=32)) == 6


def test_bad_samples_are_skipped_and_named(tmp_path, caplog):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        add(tar, "a.jpg", image_bytes((200, 0, 0)))
        add(tar, "a.txt", b"a red square")
        add(tar, "b.jpg", b"not an image")  # corrupt
        add(tar, "b.txt", b"a broken one")
        add(tar, "c.png", image_bytes((0, 0, 200, 128), "PNG", mode="RGBA"))  # alpha: converted
        add(tar, "c.txt", b"a blue square")
        add(tar, "d.jpg", image_bytes((0, 200, 0)))  # no caption
        add(tar, "e.jpg", image_bytes(128, mode="L"))  # grey: converted
        add(tar, "e.txt", b"a grey square")
        add(tar, "f.jpg", image_bytes((0, 200, 0)))
        add(tar, "f.txt", "une fl\xe8che".encode("latin-1"))  # not UTF-8
    dataset = ShardDataset(str(tmp_path / "00000.tar"), resolution=32)
    before = ShardDataset.skipped
    prompts = [dataset[i]["prompt"] for i in range(len(dataset))]
    # A bad sample gives its place to the next one (the last to the first).
    assert prompts == ["a red square", "a blue square", "a blue square", "a grey square", "a grey square", "a red square"]
    assert ShardDataset.skipped - before == 3
    assert "00000.tar:b" in caplog.text and "not UTF-8" in caplog.text and "no .txt caption" in caplog.text


def test_missing_shards_fail_with_the_pattern_named(tmp_path):
    write_shards(tmp_path, shards=1)
    with pytest.raises(MissingPathError, match="1 of 2 shards do not exist"):
        expand_shards(str(tmp_path / "{00000..00001}.tar"))


def test_an_unreadable_shard_is_skipped_and_named(tmp_path, caplog):
    write_shards(tmp_path, shards=1, stats=False)
    (tmp_path / "00001.tar").write_bytes(b"\x00 not a tar file" * 100)
    dataset = ShardDataset(str(tmp_path / "{00000..00001}.tar"), resolution=32)
    assert len(dataset) == 4 and dataset.skipped_shards == 1
    assert "00001.tar" in caplog.text and "not a readable tar" in caplog.text
    with pytest.raises(MissingPathError, match="none of the 1 shards"):
        ShardDataset(str(tmp_path / "00001.tar"), resolution=32)


def test_ranks_and_workers_see_every_sample_once(tmp_path):
    """2 ranks x 2 DataLoader workers: every sample exactly once (captions are unique here)."""
    from torch.utils.data import DataLoader

    write_shards(tmp_path, shards=3, per_shard=4)
    dataset = ShardDataset(str(tmp_path / "{00000..00002}.tar"), resolution=32)
    seen = []
    for rank in range(2):
        sampler = ResumableSampler(len(dataset), 2, shuffle=True, seed=0, rank=rank, world_size=2)
        loader = DataLoader(dataset, batch_size=2, sampler=sampler, num_workers=2)
        seen += [prompt for batch in loader for prompt in batch["prompt"]]
    expected = [dataset.caption(i) for i in range(len(dataset))]
    assert len(set(expected)) == len(expected) and sorted(seen) == sorted(expected)


def test_a_resumed_rank_continues_with_its_next_unseen_samples(tmp_path):
    """Killed after 2 batches per rank and resumed: each rank reads on from its third batch, so the
    resumed epoch and the interrupted start together are the uninterrupted epoch."""
    write_shards(tmp_path, shards=3, per_shard=4)
    dataset = ShardDataset(str(tmp_path / "{00000..00002}.tar"), resolution=32)
    for rank in range(2):
        def epoch(start, rank=rank):
            sampler = ResumableSampler(len(dataset), 1, shuffle=True, seed=3, start_batch=start, rank=rank, world_size=2)
            return [dataset[i]["prompt"] for i in sampler]

        uninterrupted, resumed = epoch(0), epoch(2)
        assert resumed == uninterrupted[2:] and len(resumed) == len(dataset) // 2 - 2


def test_toy_shards_hold_the_toy_world_exactly(tmp_path):
    from lightning_sdxl.data.toy_world import ToyWorld
    from lightning_sdxl.toy.write_shards import write_toy_shards

    write_toy_shards(tmp_path / "shards", shards=2, per_shard=3)
    dataset, world = ShardDataset(str(tmp_path / "shards" / "{00000..00001}.tar"), resolution=32), ToyWorld(32, world="simple")
    assert len(dataset) == 6
    for i in (0, 4):
        assert dataset[i]["prompt"] == world[i]["prompt"]
        assert torch.equal(dataset[i]["pixel_values"], world[i]["pixel_values"])


def test_a_short_run_trains_from_shards(tmp_path, make_config):
    from lightning_sdxl.train import train

    write_shards(tmp_path)
    trainer = train(make_config("data=webdataset", f"data.shards='{tmp_path}/{{00000..00001}}.tar'", "data.resolution=64",
                                "data.num_workers=0", "data.batch_size=2"))
    assert trainer.global_step == 4
    assert isinstance(trainer.datamodule, WebDatasetDataModule)


def test_aesthetic_scores_from_the_metadata_filter_and_are_counted(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for key, meta in (("a", {"aesthetic": 4.0}), ("b", {"AESTHETIC_SCORE": 6.5}), ("c", {"url": "x"})):
            add(tar, f"{key}.jpg", image_bytes((200, 0, 0)))
            add(tar, f"{key}.txt", f"sample {key}".encode())
            add(tar, f"{key}.json", json.dumps(meta).encode())
    data = WebDatasetDataModule(str(tmp_path / "00000.tar"), resolution=32, batch_size=1, num_workers=0,
                                filters={"min_aesthetic": 5.0})
    prompts = [data.dataset[i]["prompt"] for i in range(3)]
    assert prompts == ["sample b", "sample b", "sample c"]  # a (4.0) dropped; c has no score: kept
    assert data.dataset.filters.dropped["min_aesthetic"] == 1


def test_cmyk_is_converted_and_tiny_images_are_filtered_and_counted(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        add(tar, "a.jpg", image_bytes((0, 200, 200, 0), mode="CMYK"))
        add(tar, "a.txt", b"a cmyk square")
        add(tar, "b.png", image_bytes((200, 0, 0), "PNG", size=(4, 4)))
        add(tar, "b.txt", b"a tiny square")
    data = WebDatasetDataModule(str(tmp_path / "00000.tar"), resolution=32, batch_size=1, num_workers=0,
                                filters={"min_side": 16})
    items = [data.dataset[i] for i in range(2)]
    assert [item["prompt"] for item in items] == ["a cmyk square", "a cmyk square"]  # b dropped: 4 px < 16
    assert items[0]["pixel_values"].shape == (3, 32, 32)
    assert data.dataset.filters.dropped["min_side"] == 1
