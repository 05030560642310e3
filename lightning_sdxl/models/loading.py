"""One loading path for SDXL pipeline folders: real SDXL (local or hub id) and the tiny model."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lightning_sdxl.models.tokenizers import check_tokenizer

REQUIRED_SUBFOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


@dataclass
class SDXLComponents:
    """The parts of an SDXL pipeline that training uses."""

    unet: UNet2DConditionModel | None  # None when loaded with unet=False
    vae: AutoencoderKL
    text_encoder: CLIPTextModel | None  # None when loaded with text_encoders=False
    text_encoder_2: CLIPTextModelWithProjection | None
    tokenizer: CLIPTokenizer
    tokenizer_2: CLIPTokenizer
    scheduler_config: dict
    force_zeros_for_empty_prompt: bool


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face endpoint answers a TCP connection within `timeout` seconds."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def check_hub_model_reachable(repo_id: str) -> None:
    """A hub id must be in the local cache or the hub must answer: offline, the hub client would
    otherwise retry for minutes per file before failing (measured: over 5 minutes for SDXL)."""
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "model_index.json"), str) or hub_reachable():
        return
    raise FileNotFoundError(
        f"model.path={repo_id} is not a local folder ({Path(repo_id).resolve()} does not exist), and as a hub id "
        f"it is not in the local Hugging Face cache while the hub is not reachable (offline): fix the path, "
        f"or download it where there is network (hf download {repo_id})."
    )


def looks_local(path: str) -> bool:
    """Whether `path` names a local folder rather than a hub id ("org/name")."""
    return Path(path).is_absolute() or path.startswith((".", "~")) or Path(path).exists()


def check_pipeline_folder(path: str) -> None:
    """Fail fast, before any weights load, if a local SDXL folder is missing or incomplete."""
    folder = Path(path)
    if not looks_local(path):
        check_hub_model_reachable(path)  # a hub id ("org/name"): from the cache or the hub
        return
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model.path={path} does not exist: point it at a diffusers SDXL folder "
            "(model_index.json, unet/, vae/, text_encoder*/, tokenizer*/, scheduler/) or a hub id."
        )
    missing = [name for name in REQUIRED_SUBFOLDERS if not (folder / name).is_dir()]
    if not (folder / "model_index.json").exists() or missing:
        raise FileNotFoundError(
            f"model.path={path} is not a complete diffusers SDXL folder (missing: "
            f"{', '.join(missing) or 'model_index.json'}): save it with "
            "StableDiffusionXLPipeline.save_pretrained or download the full repository."
        )


def _pipeline_config(path: str) -> dict:
    local = Path(path) / "model_index.json"
    if local.exists():
        return json.loads(local.read_text())
    from huggingface_hub import hf_hub_download

    return json.loads(Path(hf_hub_download(path, "model_index.json")).read_text())


def load_sdxl(
    path: str, variant: str | None = None, dtype: torch.dtype = torch.float32, text_encoders: bool = True,
    unet: bool = True,
) -> SDXLComponents:
    """Load an SDXL pipeline folder or hub id, component by component (never remote code).

    Args:
        path: a local diffusers SDXL folder or a hub id.
        variant: weight file variant, e.g. "fp16", or None for the default weights.
        dtype: dtype to load every model in.
        text_encoders: load both text encoders (a run from a latent cache needs none: 817 M
            parameters of SDXL's not loaded).
        unet: load the UNet (the single-file export of such a run needs only the encoders).
    """
    check_pipeline_folder(path)
    kwargs = {"variant": variant, "torch_dtype": dtype, "use_safetensors": True}
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    tokenizer_2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2")
    for name, loaded in (("tokenizer", tokenizer), ("tokenizer_2", tokenizer_2)):
        check_tokenizer(loaded, f"{path}/{name}")
    scheduler_config = dict(EulerDiscreteScheduler.load_config(path, subfolder="scheduler"))
    return SDXLComponents(
        unet=UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs) if unet else None,
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs),
        text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kwargs_tf(kwargs))
        if text_encoders else None,
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kwargs_tf(kwargs))
        if text_encoders else None,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler_config=scheduler_config,
        force_zeros_for_empty_prompt=_pipeline_config(path).get("force_zeros_for_empty_prompt", True),
    )


def frozen_encoders(components: SDXLComponents, dtype: torch.dtype, encode: bool = True):
    """The frozen VAE and both text encoders (as one `SDXLTextEncoder`) in `dtype`: what the training
    module and the latent cache's writer (precompute.py) encode with, built in one place so a cache
    holds exactly what training would compute. `encode=False` (a run from a latent cache): the VAE
    without its encoder, for decoding only, and no text encoders (None)."""
    from lightning_sdxl.models.text_encoding import SDXLTextEncoder

    vae = cast(components.vae.requires_grad_(False), dtype).eval()
    if not encode:
        vae.encoder = vae.quant_conv = None  # decode() uses post_quant_conv and decoder only
        return vae, None
    text_encoder = SDXLTextEncoder(
        components.text_encoder.to(dtype),
        components.text_encoder_2.to(dtype),
        components.tokenizer,
        components.tokenizer_2,
        zero_empty_prompt=components.force_zeros_for_empty_prompt,
    )
    return vae, text_encoder


def cast(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(dtype)`, skipped when every weight already has it: diffusers 0.42 warns on each
    `.to(dtype)` of a UNet or VAE ("modules ... should be kept in float32: []"), even a no-op one."""
    if all(tensor.dtype == dtype for tensor in model.parameters()):
        return model
    return model.to(dtype)


def load_unet(
    path: str, variant: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[UNet2DConditionModel, dict]:
    """The UNet and scheduler config of an SDXL pipeline folder or hub id (a second teacher)."""
    check_pipeline_folder(path)
    unet = UNet2DConditionModel.from_pretrained(
        path, subfolder="unet", variant=variant, torch_dtype=dtype, use_safetensors=True
    )
    return unet, dict(EulerDiscreteScheduler.load_config(path, subfolder="scheduler"))


# Scheduler keys that define the forward process q(x_t | x_0); two models trained on different
# ones do not share timesteps.
NOISE_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


def check_same_noise_schedule(config: dict, other: dict, path: str, other_path: str) -> None:
    """Raise ValueError when two scheduler configs define different noise schedules."""
    differ = [key for key in NOISE_SCHEDULE_KEYS if config.get(key) != other.get(key)]
    if differ:
        raise ValueError(
            f"{other_path} has another noise schedule than {path} ({', '.join(differ)} differ): "
            "a teacher and its student must share the forward process; give a teacher distilled from the same base."
        )


def kwargs_tf(kwargs: dict) -> dict:
    """transformers 5 spells diffusers' `torch_dtype` as `dtype`."""
    return {"variant": kwargs["variant"], "dtype": kwargs["torch_dtype"], "use_safetensors": True}
