"""A tiny SDXL: the real classes and code path at toy size, built offline and deterministically.

It writes itself as a standard diffusers SDXL folder, so after `load_sdxl` the tiny model and
real SDXL go through literally the same code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lightning_sdxl.models.tokenizers import (
    CLIP_MAX_LENGTH,
    CLIP_VOCAB_SIZE,
    offline_clip_tokenizer,
)

# Bump when the architecture below changes, so cached folders of an older build are not reused.
TINY_SDXL_VERSION = 2  # 2: text encoders 32 and 48 wide (were both 32)
TINY_BLOCK_OUT_CHANNELS = (32, 64)  # UNet levels; the discriminator sees R/8/2 latent pixels
TEXT_WIDTH = 32  # the default width of a toy CLIP text encoder
# Text encoders of unequal widths, as SDXL's (768 and 1280): diffusers' single-file reader
# (0.42.1, create_diffusers_clip_model_from_ldm) tells CLIP-L from OpenCLIP by width alone, so two
# encoders of one width load text_encoder_2 with CLIP-L's weights from an all-in-one file. Both
# committed toy teachers are built with these widths.
TOY_TEXT_WIDTHS = (32, 48)  # cross_attention_dim = 32 + 48
ADDITION_TIME_EMBED_DIM = 8  # projection_class_embeddings_input_dim = 48 + 6 x 8 = 96

# SDXL base 1.0's scheduler config (scaled_linear betas; the project only reads the schedule).
SDXL_SCHEDULER_CONFIG = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}


def _text_config(projection: bool, width: int = TEXT_WIDTH) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,
        num_attention_heads=4,
        num_hidden_layers=3,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=width if projection else 512,
        hidden_act="gelu",
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=1,
    )


def _random_sdxl(
    seed: int, unet_size: dict, vae_size: dict, text_widths: tuple[int, int] = (TEXT_WIDTH, TEXT_WIDTH)
) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL pipeline: SDXL's UNet (4 latent channels, `text_time` added
    conditioning, cross-attention on both text encoders' states) and AutoencoderKL, sized by
    `unet_size` / `vae_size`, with two toy CLIP text encoders of `text_widths`, offline tokenizers
    and SDXL's scheduler. Deterministic in `seed`, global RNG untouched."""
    width_1, width_2 = text_widths
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=width_2 + 6 * ADDITION_TIME_EMBED_DIM,  # pooled text 2
            cross_attention_dim=width_1 + width_2,
            **unet_size,
        )
        levels = len(vae_size["block_out_channels"])
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            force_upcast=False,
            **vae_size,
        )
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(_text_config(projection=False, width=width_1)),
            text_encoder_2=CLIPTextModelWithProjection(_text_config(projection=True, width=width_2)),
            tokenizer=offline_clip_tokenizer(),
            tokenizer_2=offline_clip_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG),
            force_zeros_for_empty_prompt=True,
        )


def build_tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL pipeline at toy size (about 2 M UNet parameters), latents
    4 x R/8 x R/8 as in SDXL (the plumbing tests' model, `model=tiny`)."""
    unet_size = {
        "sample_size": 16,
        "block_out_channels": TINY_BLOCK_OUT_CHANNELS,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "norm_num_groups": 32,
    }
    # SD's rule, scaling_factor = 1 / std(latents): this random VAE's posterior samples on toy
    # images have std 1.04 (measured on 32 images), so 1.0 keeps latents at unit scale.
    vae_size = {"block_out_channels": (32, 32, 64, 64), "sample_size": 128, "scaling_factor": 1.0}
    return _random_sdxl(seed, unet_size, vae_size, TOY_TEXT_WIDTHS)


# The committed toy teacher's architecture (lightning_sdxl/assets/toy-sdxl): 32 px images, a VAE
# that downsamples by 4 (latents 4 x 8 x 8), a 3.5 M-parameter UNet with cross-attention at both
# levels. (48, 96) ran at 0.33 s per batch of 64 here (2 cores), (64, 128) at 0.62 s, (32, 64) 0.28 s.
TOY_RESOLUTION = 32
TOY_BLOCK_OUT_CHANNELS = (48, 96)
def build_toy_sdxl(seed: int = 0, text_widths: tuple[int, int] = TOY_TEXT_WIDTHS) -> StableDiffusionXLPipeline:
    """The toy teacher's SDXL pipeline, randomly initialised (trained by lightning_sdxl.toy.build_teacher)."""
    unet_size = {
        "sample_size": TOY_RESOLUTION // 4,
        "block_out_channels": TOY_BLOCK_OUT_CHANNELS,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "transformer_layers_per_block": 1,
        "norm_num_groups": 16,
    }
    # scaling_factor is set from the trained VAE's latent std (lightning_sdxl.toy.autoencoder).
    vae_size = {"block_out_channels": (32, 64, 64), "sample_size": TOY_RESOLUTION, "scaling_factor": 1.0}
    return _random_sdxl(seed, unet_size, vae_size, text_widths)


def default_cache_dir() -> Path:
    """Where generated assets live: $LIGHTNING_SDXL_HOME, else ~/.cache/lightning_sdxl."""
    return Path(os.environ.get("LIGHTNING_SDXL_HOME", Path.home() / ".cache" / "lightning_sdxl"))


def tiny_sdxl_folder(seed: int = 0) -> Path:
    """The tiny model's folder under $LIGHTNING_SDXL_HOME (`${tiny_sdxl:<seed>}` in conf/model/tiny.yaml),
    written on first use; an existing folder is returned as it is."""
    folder = default_cache_dir() / f"tiny-sdxl-v{TINY_SDXL_VERSION}-seed{seed}"
    return folder if (folder / "model_index.json").exists() else ensure_tiny_sdxl(folder, seed)


def ensure_tiny_sdxl(folder: str | os.PathLike | None = None, seed: int = 0) -> Path:
    """Write the tiny SDXL as a diffusers folder once (atomically) and return its path."""
    folder = Path(folder) if folder else default_cache_dir() / f"tiny-sdxl-v{TINY_SDXL_VERSION}-seed{seed}"
    if (folder / "model_index.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        build_tiny_sdxl(seed).save_pretrained(staging, safe_serialization=True)
        try:
            staging.rename(folder)
        except OSError:
            # Another process (a DDP rank) finished first; its folder is identical.
            if not (folder / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder
