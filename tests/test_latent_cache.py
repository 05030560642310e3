"""The latent cache (python -m lightning_sdxl.precompute, data=cached): a run from the cache trains
exactly as the run from the images it was written from, and a cache that does not fit is refused
before any model loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR, CPU_OVERRIDES, compose_config
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from safetensors.torch import load_file

from lightning_sdxl.config_checks import validate_config
from lightning_sdxl.data.cached import CachedDataModule
from lightning_sdxl.errors import ConfigError, MissingPathError
from lightning_sdxl.export import SINGLE_FILE
from lightning_sdxl.precompute import write_cache
from lightning_sdxl.train import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cache") / "toy_cache"
    overrides = [o for o in CPU_OVERRIDES if not o.startswith("logger")]  # as the runs below
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("precompute", overrides=[*overrides, f"cache_dir={folder}", "max_items=12", "encode_batch_size=2",
                                                "shard_items=4"])
    write_cache(cfg)
    return folder


def trained_state(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]


def test_a_run_from_the_cache_equals_the_run_from_the_images(cache, tmp_path):
    run = ("steps=4", "checkpoint.every_n_steps=4", "validation.every_n_steps=4", "logger=none")
    train(compose_config(list(run), tmp_path / "images"))
    cached = ["data=cached", f"data.cache_dir={cache}", "data.resolution=64", "data.batch_size=2", "data.num_workers=0"]
    train(compose_config([*run, *cached], tmp_path / "cached"))
    images, from_cache = trained_state(tmp_path / "images"), trained_state(tmp_path / "cached")
    assert images.keys() == from_cache.keys() and len(images) > 0
    different = [key for key in images if not torch.allclose(images[key], from_cache[key], rtol=0, atol=1e-6)]
    assert not different, f"{len(different)} of {len(images)} tensors differ, e.g. {different[:3]}"
    assert not all(torch.equal(images[k], torch.zeros_like(images[k])) for k in images)
    # The cached run has no VAE encoder or text encoders in memory: its all-in-one export reads them
    # from the model folder, and holds the same weights as the image run's.
    single = lambda run: load_file(str(run / "export" / SINGLE_FILE))
    exported_images, exported_cached = single(tmp_path / "images"), single(tmp_path / "cached")
    assert exported_images.keys() == exported_cached.keys()
    assert all(torch.equal(exported_images[k], exported_cached[k]) for k in exported_images)


@pytest.mark.parametrize("stage", ["8to4", "128to32"])  # 128to32: the teacher's CFG needs the empty prompt
def test_a_module_from_the_cache_holds_no_text_encoder_and_conditions_as_the_encoders_give(
    cache, tmp_path, tiny_sdxl_path, stage
):
    import hydra

    def module(*overrides):
        cfg = compose_config([f"stage={stage}", f"model.path={tiny_sdxl_path}", *overrides], tmp_path / "run")
        return hydra.utils.instantiate(cfg.module)

    from_images = module()
    from_cache = module("data=cached", f"data.cache_dir={cache}", "data.resolution=64")
    assert from_cache.text_encoder is None and from_cache.vae.encoder is None and from_cache.vae.decoder is not None
    frozen = lambda module: sum(p.numel() for p in module.parameters() if not p.requires_grad)
    assert frozen(from_images) - frozen(from_cache) == sum(
        p.numel() for part in (from_images.text_encoder, from_images.vae.encoder, from_images.vae.quant_conv)
        for p in part.parameters()
    )
    prompts = CachedDataModule(str(cache), resolution=64, num_val_prompts=2).val_prompts
    expected, stored = from_images.condition(prompts), from_cache.condition(prompts)
    for key in ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids"):
        assert torch.equal(getattr(expected, key), getattr(stored, key)), key
    if stage == "128to32":
        expected, stored = from_images.uncondition(expected), from_cache.uncondition(stored)
        assert torch.equal(expected.prompt_embeds, stored.prompt_embeds)
        assert torch.equal(expected.pooled_prompt_embeds, stored.pooled_prompt_embeds)
    else:
        assert from_cache.uncondition(stored) is None
    with pytest.raises(KeyError, match="validation prompts"):
        from_cache.condition(["a prompt the cache never saw"])


def test_the_cache_holds_what_the_encoders_give(cache):
    data = CachedDataModule(str(cache), resolution=64, batch_size=2, num_workers=0, num_val_prompts=2)
    assert len(data.dataset) == 12 and len(data.dataset.shards) == 3
    item = data.dataset[5]
    assert item["latent_mean"].shape == item["latent_logvar"].shape and item["prompt"]
    assert data.validation_images().shape[0] == 2 and len(data.val_prompts) == 2


@pytest.mark.parametrize(
    ("override", "error", "words"),
    [("data.resolution=32", ConfigError, "64 px latents"), ("data.cache_dir={missing}", MissingPathError, "precompute")],
)
def test_a_cache_that_does_not_fit_is_refused_before_models_load(cache, tmp_path, override, error, words):
    cfg = compose_config(["data=cached", f"data.cache_dir={cache}", "data.resolution=64",
                          override.format(missing=tmp_path / "none")], tmp_path / "run")
    with open_dict(cfg):
        cfg.data.batch_size = 2
    with pytest.raises(error, match=words):
        validate_config(cfg)


def test_a_cache_without_stored_conditions_is_refused_before_models_load(cache, tmp_path):
    import shutil

    from lightning_sdxl.data.latent_cache import CONDITIONS_FILE, check_cache_fits, read_cache_info

    old = tmp_path / "old_cache"
    shutil.copytree(cache, old)
    (old / CONDITIONS_FILE).unlink()
    with pytest.raises(ConfigError, match="older precompute"):
        check_cache_fits(old, read_cache_info(old)["model"], 64)


def test_a_stage_teacher_linking_the_base_encoders_fits_the_cache_and_a_copy_does_not(cache, tmp_path):
    """The recipe's stage teachers link the base model's VAE and text encoders (recipe.finish_stage),
    so one cache serves every phase; another model's encoders are refused."""
    import json
    import os
    import shutil

    from lightning_sdxl.data.latent_cache import CACHE_INFO, check_cache_fits

    base = Path(json.loads((cache / CACHE_INFO).read_text())["model"])
    teacher, other = tmp_path / "teacher", tmp_path / "other"
    teacher.mkdir()
    for name in ("vae", "text_encoder", "text_encoder_2", "unet"):
        os.symlink(base / name, teacher / name)
    check_cache_fits(cache, str(teacher), 64)
    shutil.copytree(base, other)
    with pytest.raises(ConfigError, match="VAE and text encoders"):
        check_cache_fits(cache, str(other), 64)
