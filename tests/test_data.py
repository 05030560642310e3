"""Tests of the datasets and datamodules: toy world, image folder, validation prompts."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from lightning_sdxl.data import (
    BACKGROUNDS,
    COLOUR_RGB,
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    FolderDataModule,
    FolderDataset,
    PromptDataset,
    ToyWorld,
    ToyWorldDataModule,
)
from lightning_sdxl.data.toy_world import (
    BACKGROUND_RGB,
    GRADIENT_RGB,
    STRIPE_RGB,
    TEXTURE_WORDS,
    WORLDS,
)

CAPTION = re.compile(
    r"^a (small|large) (\w+) (\w+) (?:at the|in the) ([\w ]+?)"
    r"(?: and a (small|large) (\w+) (\w+) (?:at the|in the) ([\w ]+?))? on a (\w+) background$"
)


def to_uint8(pixel_values: torch.Tensor) -> np.ndarray:
    """(3, R, R) in [-1, 1] -> (R, R, 3) uint8."""
    return ((pixel_values + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def assert_training_item(item: dict, resolution: int) -> None:
    assert item["pixel_values"].shape == (3, resolution, resolution)
    assert item["pixel_values"].dtype == torch.float32
    assert item["pixel_values"].min() >= -1 and item["pixel_values"].max() <= 1
    assert isinstance(item["prompt"], str) and item["prompt"]
    for key in ("original_size", "crop_top_left"):
        assert item[key].shape == (2,) and item[key].dtype == torch.int64


# Toy world.


def test_toy_world_is_deterministic_by_index():
    world = ToyWorld(resolution=32, size=100, seed=0)
    a, b, fresh = world[7], world[7], ToyWorld(resolution=32, size=5, seed=0)[7]
    for other in (b, fresh):
        assert torch.equal(a["pixel_values"], other["pixel_values"])
        assert a["prompt"] == other["prompt"]
    assert torch.equal(world[-1]["pixel_values"], world[99]["pixel_values"])
    items = [world[i] for i in range(20)]
    assert len({item["prompt"] for item in items}) > 10
    assert not torch.equal(items[0]["pixel_values"], items[1]["pixel_values"])
    other_seed = [ToyWorld(resolution=32, seed=1).scene(i).caption for i in range(20)]
    assert other_seed != [item["prompt"] for item in items]


def test_toy_world_items_follow_the_contract():
    world = ToyWorld(resolution=48, size=10)
    for i in (0, 1, 10**12):  # unbounded: indices past `size` work too
        item = world[i]
        assert_training_item(item, 48)
        assert item["original_size"].tolist() == [48, 48]
        assert item["crop_top_left"].tolist() == [0, 0]
    assert len(world) == 10
    with pytest.raises(IndexError):
        world[-11]


def test_captions_name_the_scene_attributes_and_cover_the_vocabulary():
    world = ToyWorld()
    seen: dict[str, set] = {"kind": set(), "colour": set(), "size": set(), "position": set()}
    backgrounds, counts = set(), set()
    for i in range(2000):
        scene = world.scene(i)
        match = CAPTION.match(scene.caption)
        assert match, scene.caption
        words = [w for w in match.groups() if w is not None]
        expected = [w for s in scene.shapes for w in (s.size, s.colour, s.kind, s.position)]
        assert words == [*expected, scene.background]
        counts.add(len(scene.shapes))
        backgrounds.add(scene.background)
        for s in scene.shapes:
            for field, values in seen.items():
                values.add(getattr(s, field))
        if len(scene.shapes) == 2:  # distinct quadrants, reading order, distinct colours
            a, b = scene.shapes
            assert POSITIONS.index(a.position) < POSITIONS.index(b.position) < 4
            assert a.colour != b.colour
    assert seen == {
        "kind": set(SHAPES),
        "colour": set(COLOURS),
        "size": set(SIZES),
        "position": set(POSITIONS),
    }
    assert backgrounds == set(BACKGROUNDS) and counts == {1, 2}


def test_rendered_pixels_show_the_caption():
    resolution = 128
    world = ToyWorld(resolution=resolution)
    yy, xx = np.mgrid[0:resolution, 0:resolution] / resolution  # (R, R) pixel corners
    for i in range(60):
        scene, image = world.scene(i), to_uint8(world[i]["pixel_values"])  # (R, R, 3)
        for shape in scene.shapes:
            rgb = np.array(COLOUR_RGB[shape.colour])
            mask = np.abs(image.astype(int) - rgb).max(-1) <= 2  # (R, R) pixels of this colour
            # The shape's centre pixel has its colour.
            cx, cy = (int(c * resolution) for c in shape.centre)
            assert mask[cy, cx], (scene.caption, image[cy, cx])
            # Its pixels sit at the stated position.
            x, y = xx[mask].mean() + 0.5 / resolution, yy[mask].mean() + 0.5 / resolution
            if shape.position == "centre":
                assert abs(x - 0.5) < 0.1 and abs(y - 0.5) < 0.1, scene.caption
            else:
                assert (y < 0.5) == ("top" in shape.position), scene.caption
                assert (x < 0.5) == ("left" in shape.position), scene.caption
            # Its area fits its kind and size (interior pixels only: edges are anti-aliased).
            h = shape.half_size * resolution
            area = {"circle": np.pi, "square": 4, "triangle": 2, "cross": 20 / 9}[shape.kind] * h**2
            assert 0.7 * area < mask.sum() < 1.1 * area, (scene.caption, mask.sum(), area)
        # The corner pixel shows the stated background.
        top_left = {**BACKGROUND_RGB, "striped": STRIPE_RGB[0], "gradient": GRADIENT_RGB[0]}
        assert np.abs(image[0, 0].astype(int) - top_left[scene.background]).max() <= 1
        if scene.background in BACKGROUND_RGB:
            assert (image[-1, -1] == BACKGROUND_RGB[scene.background]).all()


# Folder dataset.


def write_image(path: Path, size: tuple[int, int], caption: str | None, mode: str = "RGB") -> None:
    """A (w, h) image with a pattern that any misplaced crop changes; caption beside it."""
    w, h = size
    rng = np.random.default_rng(w * 1000 + h)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode).save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(f"  {caption}\n")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    write_image(tmp_path / "b_wide.png", (100, 60), "a wide image")
    write_image(tmp_path / "a_tall.webp", (50, 90), "a tall image")
    (tmp_path / "sub").mkdir()
    write_image(tmp_path / "sub" / "c_grey.PNG", (40, 40), "a grey square", mode="L")
    (tmp_path / "notes.md").write_text("not an image")
    return tmp_path


def test_folder_dataset_crops_and_records_sizes_exactly(image_folder: Path):
    data = FolderDataset(image_folder, resolution=32)
    assert [p.name for p in data.images] == ["a_tall.webp", "b_wide.png", "c_grey.PNG"]
    # Shorter side to 32; (h, w) 90 x 50 -> 57 x 32 and 60 x 100 -> 32 x 53; centre crop.
    expected = {0: ((90, 50), (57, 32), (12, 0)), 1: ((60, 100), (32, 53), (0, 10))}
    for i, ((h, w), (new_h, new_w), (top, left)) in expected.items():
        item = data[i]
        assert_training_item(item, 32)
        assert item["original_size"].tolist() == [h, w]
        assert item["crop_top_left"].tolist() == [top, left]
        with Image.open(data.images[i]) as source:
            resized = source.convert("RGB").resize((new_w, new_h), Image.Resampling.BICUBIC)
        reference = np.asarray(resized.crop((left, top, left + 32, top + 32)))
        assert (to_uint8(item["pixel_values"]) == reference).all()
    grey = data[2]
    assert grey["original_size"].tolist() == [40, 40] and grey["crop_top_left"].tolist() == [0, 0]
    assert torch.equal(grey["pixel_values"][0], grey["pixel_values"][2])  # L mode -> RGB
    assert [data[i]["prompt"] for i in range(3)] == [
        "a tall image",
        "a wide image",
        "a grey square",
    ]


def test_folder_dataset_errors_name_the_problem(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as error:
        FolderDataset(missing, resolution=32)
    assert str(error.value) == (
        f"data.root={missing} does not exist: point data.root at a folder of images with "
        "sidecar .txt captions"
    )
    with pytest.raises(FileNotFoundError, match="holds no images"):
        FolderDataset(tmp_path, resolution=32)
    for k in range(7):
        write_image(tmp_path / f"img{k}.jpg", (20, 30), caption="ok" if k == 3 else None)
    with pytest.raises(FileNotFoundError) as error:
        FolderDataset(tmp_path, resolution=32)
    message = str(error.value)
    assert "6 of 7 images" in message and "and 1 more" in message and "<stem>.txt" in message
    assert "img0.jpg, img1.jpg, img2.jpg, img4.jpg, img5.jpg" in message
    assert "img3.jpg" not in message


# Validation prompts.


def test_prompt_dataset_collates_to_prompts_and_int64_seeds():
    data = PromptDataset(["a", "b", "c"], [5, 6, 7])
    batch = next(iter(DataLoader(data, batch_size=3)))
    assert batch["prompt"] == ["a", "b", "c"]
    assert batch["seed"].dtype == torch.int64 and batch["seed"].tolist() == [5, 6, 7]
    with pytest.raises(ValueError, match="one seed per prompt"):
        PromptDataset(["a", "b"], [0])


# Datamodules.


def test_toy_world_datamodule_batches():
    dm = ToyWorldDataModule(resolution=32, batch_size=4, train_size=10, num_val_prompts=3, seed=2)
    assert dm.hparams.train_size == 10
    train = dm.train_dataloader()
    assert len(train) == 2  # drop_last
    batch = next(iter(train))
    assert batch["pixel_values"].shape == (4, 3, 32, 32)
    assert batch["original_size"].shape == batch["crop_top_left"].shape == (4, 2)
    assert batch["original_size"].dtype == torch.int64 and len(batch["prompt"]) == 4
    assert batch["prompt"] == [ToyWorld(32, seed=2, world="simple").scene(i).caption for i in range(4)]

    val = list(dm.val_dataloader())
    assert [len(b["prompt"]) for b in val] == [3]
    assert val[0]["seed"].tolist() == [0, 1, 2] and val[0]["seed"].dtype == torch.int64
    images = dm.validation_images()
    assert images.shape == (3, 3, 32, 32)
    for k, i in enumerate(dm.val_indices):  # held out: far past any training index
        assert i >= 10**9
        assert val[0]["prompt"][k] == dm.world.scene(i).caption
        assert torch.equal(images[k], dm.world[i]["pixel_values"])


def test_simple_world_is_the_teachers_vocabulary():
    world = ToyWorld(32, world="simple")
    scenes = [world.scene(i) for i in range(400)]
    assert {len(s.shapes) for s in scenes} == {1}
    v = WORLDS["simple"]
    assert {s.shapes[0].kind for s in scenes} == set(v.shapes) and {s.background for s in scenes} == set(v.backgrounds)
    assert {s.shapes[0].position for s in scenes} == set(v.positions) and {s.shapes[0].colour for s in scenes} == set(v.colours)
    with pytest.raises(ValueError, match="unknown toy world"):
        ToyWorld(32, world="nope")


def test_open_world_leaves_shape_position_and_texture_phase_free():
    """The world where blur can happen: deterministic by index; a caption names colour and texture
    only, and one caption has many sharp outcomes (kinds, quadrants, phases)."""
    world = ToyWorld(32, world="open")
    assert torch.equal(world[7]["pixel_values"], ToyWorld(32, world="open")[7]["pixel_values"])
    scenes = [world.scene(i) for i in range(600)]
    v = WORLDS["open"]
    captions = {s.caption for s in scenes}
    assert len(captions) == len(v.colours) * len(v.backgrounds) == 12
    for scene in scenes[:50]:
        assert scene.caption == f"a {scene.shapes[0].colour} shape on a {TEXTURE_WORDS[scene.background]} background"
    one_caption = [s for s in scenes if s.caption == scenes[0].caption]
    assert len({s.shapes[0].kind for s in one_caption}) == 3 and len({s.shapes[0].position for s in one_caption}) == 4
    assert len({s.phase for s in one_caption}) == len(one_caption)  # a continuum of phases
    # The phase moves the texture: two items of one caption differ in the background.
    a, b = (world[scenes.index(s)]["pixel_values"] for s in one_caption[:2])
    assert (a - b).abs().amax() > 1.0
    # The mean of one caption's images is flat where the texture was: nothing sharp survives averaging.
    mean = torch.stack([world[scenes.index(s)]["pixel_values"] for s in one_caption]).mean(0)
    sharp = torch.stack([world[scenes.index(s)]["pixel_values"] for s in one_caption]).std(0).mean()
    assert mean.std() < 0.5 * sharp


def test_toy_world_worker_gives_the_same_batches():
    in_process = ToyWorldDataModule(resolution=16, batch_size=3, train_size=6, num_workers=0)
    in_worker = ToyWorldDataModule(resolution=16, batch_size=3, train_size=6, num_workers=1)
    for a, b in zip(in_process.train_dataloader(), in_worker.train_dataloader(), strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and a["prompt"] == b["prompt"]


def test_folder_datamodule(image_folder: Path):
    for k in range(3):
        write_image(image_folder / f"d{k}.jpg", (64 + k, 48), f"extra {k}")
    dm = FolderDataModule(
        str(image_folder), resolution=24, batch_size=2, num_workers=0, num_val_prompts=2
    )
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # 6 images, drop_last
    for batch in batches:
        assert batch["pixel_values"].shape == (2, 3, 24, 24)
        assert batch["crop_top_left"].dtype == torch.int64 and len(batch["prompt"]) == 2
    assert sorted(p for b in batches for p in b["prompt"]) == sorted(
        dm.dataset.caption(i) for i in range(6)
    )
    val = next(iter(dm.val_dataloader()))
    assert val["prompt"] == ["a tall image", "a wide image"] and val["seed"].tolist() == [0, 1]
    assert dm.validation_images().shape == (2, 3, 24, 24)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        FolderDataModule(str(image_folder / "missing"))
