"""A latent cache: each training image's VAE posterior and its caption's text-encoder outputs, computed
once (`python -m lightning_sdxl.precompute`) and read by `data=cached` in every later run.

The real step encodes every image with the VAE (4.9 TFLOPs per sample at 1024 px, 72 % of a UNet
forward: docs/benchmark_step.md) and runs both text encoders, in every phase of the recipe. The cache
stores the posterior's mean and log-variance, not a latent, so training still draws a fresh sample
x0 = (mean + exp(logvar / 2) eps - shift) * scaling each time (`models/vae.sample_latents`, as for images); and the
UNet's whole condition (prompt embeddings, pooled embedding, the six micro-conditioning numbers).

Layout of a cache folder (written atomically):
    cache_info.json          model, resolution, items, shards, validation prompts and seeds
    shard-00000.safetensors  latent_mean, latent_logvar (N, 4, R/f, R/f); prompt_embeds (N, 77, D);
                             pooled_prompt_embeds (N, P); add_time_ids (N, 6)
    shard-00000.json         the N captions
    validation.safetensors   the source's validation images (data/cached.py)
    conditions.safetensors   the validation prompts' conditions and the empty prompt's embeddings
                             (data/stored_conditions.py)
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset

from lightning_sdxl.errors import ConfigError, MissingPathError

CACHE_INFO = "cache_info.json"
CONDITIONS_FILE = "conditions.safetensors"  # data/stored_conditions.py
TENSOR_KEYS = ("latent_mean", "latent_logvar", "prompt_embeds", "pooled_prompt_embeds", "add_time_ids")


def write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor], captions: list[str]) -> dict:
    name = f"shard-{index:05d}"
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(captions))
    return {"file": f"{name}.safetensors", "items": len(captions)}


def read_cache_info(cache_dir: str | Path) -> dict:
    """The cache's cache_info.json; a clear error when the folder is not a cache."""
    info = Path(cache_dir) / CACHE_INFO
    if not info.is_file():
        raise MissingPathError(
            f"data.cache_dir={cache_dir} holds no {CACHE_INFO}: write the cache first with "
            "python -m lightning_sdxl.precompute data=<source> cache_dir=<folder>."
        )
    return json.loads(info.read_text())


ENCODER_FOLDERS = ("vae", "text_encoder", "text_encoder_2")


def encoder_files(model_path: str) -> list[str]:
    """What identifies the encoders a cache depends on: the real paths of a local folder's VAE and
    text-encoder files (the recipe's stage teachers link the base model's, so they match it), or
    the hub id."""
    folder = Path(model_path)
    if not folder.is_dir():
        return [str(model_path)]
    return sorted(
        os.path.realpath(file) for name in ENCODER_FOLDERS for file in (folder / name).glob("*") if file.is_file()
    )


def check_cache_fits(cache_dir: str | Path, model_path: str, resolution: int) -> None:
    """The cache was written with this model's VAE and text encoders at this resolution (checked
    before models load)."""
    info = read_cache_info(cache_dir)
    if info["resolution"] != resolution:
        raise ConfigError(
            f"data.cache_dir={cache_dir} holds {info['resolution']} px latents, the run trains at "
            f"data.resolution={resolution}: precompute a cache at this resolution or set data.resolution={info['resolution']}."
        )
    if not (Path(cache_dir) / CONDITIONS_FILE).is_file():
        raise ConfigError(
            f"data.cache_dir={cache_dir} holds no {CONDITIONS_FILE} (written by an older precompute): "
            "write the cache again with python -m lightning_sdxl.precompute."
        )
    if info["encoders"] != encoder_files(model_path):
        raise ConfigError(
            f"data.cache_dir={cache_dir} was encoded by {info['model']}'s VAE and text encoders, the run loads "
            f"model.path={model_path}: precompute a cache with that model."
        )


class CachedLatents(Dataset):
    """The cache's items, each a dict of TENSOR_KEYS and its "prompt", read lazily shard by shard."""

    def __init__(self, cache_dir: str | Path):
        self.folder = Path(cache_dir)
        self.info = read_cache_info(cache_dir)
        self.shards = self.info["shards"]
        self.starts = [0]
        for shard in self.shards:
            self.starts.append(self.starts[-1] + shard["items"])
        self._open: dict[int, tuple] = {}  # per process (DataLoader workers each open their own)

    def __len__(self) -> int:
        return self.starts[-1]

    def _shard(self, index: int):
        if index not in self._open:
            name = self.folder / self.shards[index]["file"]
            captions = json.loads(name.with_suffix(".json").read_text())
            self._open[index] = (safe_open(str(name), framework="pt"), captions)
        return self._open[index]

    def _locate(self, i: int) -> tuple[int, int]:
        """(shard, row) of item i."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        shard = bisect.bisect_right(self.starts, i) - 1
        return shard, i - self.starts[shard]

    def caption(self, i: int) -> str:
        """Item i's caption, read from its shard's captions without its tensors."""
        shard, row = self._locate(i)
        return self._shard(shard)[1][row]

    def __getitem__(self, i: int) -> dict:
        shard, row = self._locate(i)
        handle, captions = self._shard(shard)
        item = {key: handle.get_slice(key)[row : row + 1][0] for key in TENSOR_KEYS}
        item["prompt"] = captions[row]
        return item
