"""python -m lightning_sdxl.precompute: write a latent cache (data/latent_cache.py) for `data=cached`.

    python -m lightning_sdxl.precompute cache_dir=outputs/toy_cache                      # the toy world
    python -m lightning_sdxl.precompute experiment=sdxl model.path=/models/sdxl-base data.root=/data/images \\
        cache_dir=/data/cache max_items=null
    python train.py data=cached data.cache_dir=/data/cache ...                           # then any run

The source is the configured `data` group and the encoders those of `model` (in its frozen dtype, as
training would run them), so training from the cache draws the same x0 and condition as training
from the images (tests/test_latent_cache.py). With the cache go the source's validation images,
prompts and seeds, and the text conditions a run from it still needs (the validation prompts', the
empty prompt's: data/stored_conditions.py), so that run loads no text encoder and no VAE encoder.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Subset

from lightning_sdxl import CONF_DIR
from lightning_sdxl.data.cached import VALIDATION_IMAGES
from lightning_sdxl.data.datamodules import ToyWorldDataModule
from lightning_sdxl.data.latent_cache import CACHE_INFO, encoder_files, write_shard
from lightning_sdxl.data.stored_conditions import write_conditions
from lightning_sdxl.io import atomic_dir
from lightning_sdxl.models.loading import frozen_encoders, load_sdxl
from lightning_sdxl.models.text_encoding import build_condition

log = logging.getLogger(__name__)


def write_cache(cfg: DictConfig) -> Path:
    """Encode the first `cfg.max_items` items of `cfg.data` into `cfg.cache_dir` (replaced atomically)."""
    model_path = str(cfg.model.path)
    datamodule = hydra.utils.instantiate(cfg.data)
    dataset = datamodule.world if isinstance(datamodule, ToyWorldDataModule) else datamodule.dataset
    count = len(dataset) if cfg.max_items is None else min(len(dataset), int(cfg.max_items))
    dtype = getattr(torch, cfg.model.frozen_dtype)
    vae, text_encoder = frozen_encoders(load_sdxl(model_path, cfg.model.variant, unet=False), dtype)  # no UNet
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae.to(device), text_encoder.to(device)
    size = (cfg.data.resolution,) * 2
    loader = DataLoader(Subset(dataset, range(count)), batch_size=cfg.encode_batch_size, num_workers=cfg.data.num_workers)
    shards, pending, captions = [], {}, []
    with atomic_dir(cfg.cache_dir) as folder, torch.no_grad():
        for batch in loader:
            posterior = vae.encode(batch["pixel_values"].to(device, dtype)).latent_dist
            condition = build_condition(
                text_encoder, batch["prompt"], size, batch["original_size"].to(device), batch["crop_top_left"].to(device)
            )
            rows = {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar,
                    "prompt_embeds": condition.prompt_embeds, "pooled_prompt_embeds": condition.pooled_prompt_embeds,
                    "add_time_ids": condition.add_time_ids}
            for key, value in rows.items():
                pending.setdefault(key, []).append(value.cpu())
            captions += list(batch["prompt"])
            if len(captions) >= cfg.shard_items:
                shards.append(_flush(folder, len(shards), pending, captions))
                pending, captions = {}, []
            log.info("Encoded %d of %d items", sum(s["items"] for s in shards) + len(captions), count)
        if captions:
            shards.append(_flush(folder, len(shards), pending, captions))
        save_file({"pixel_values": datamodule.validation_images().contiguous()}, str(folder / VALIDATION_IMAGES))
        write_conditions(folder, text_encoder, list(datamodule.val_prompts), cfg.data.resolution)
        info = {
            "model": model_path, "encoders": encoder_files(model_path), "resolution": cfg.data.resolution, "dtype": cfg.model.frozen_dtype,
            "items": count, "source": cfg.data._target_, "shuffle": not isinstance(datamodule, ToyWorldDataModule),
            "shards": shards, "validation": {"prompts": list(datamodule.val_prompts), "seeds": list(datamodule.val_seeds)},
        }
        (folder / CACHE_INFO).write_text(json.dumps(info, indent=2) + "\n")
    log.info("Latent cache of %d items written to %s", count, cfg.cache_dir)
    return Path(cfg.cache_dir)


def _flush(folder: Path, index: int, pending: dict, captions: list[str]) -> dict:
    return write_shard(folder, index, {key: torch.cat(values) for key, values in pending.items()}, captions)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="precompute")
def main(cfg: DictConfig) -> None:
    write_cache(cfg)


if __name__ == "__main__":
    main()
