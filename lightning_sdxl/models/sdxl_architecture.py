"""SDXL base 1.0's architecture without its weights: the configs of its UNet, VAE and two text
encoders (as stabilityai/stable-diffusion-xl-base-1.0 ships them), built on the meta device.

For measuring the real model's FLOPs and memory where its 7 GB of weights are absent
(`lightning_sdxl.benchmarks.step`); nothing here can produce an image.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lightning_sdxl.models.loading import SDXLComponents, cast
from lightning_sdxl.models.tiny import SDXL_SCHEDULER_CONFIG
from lightning_sdxl.models.tokenizers import offline_clip_tokenizer

SDXL_UNET_CONFIG = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
}
SDXL_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
CLIP_L_CONFIG = {  # text_encoder: OpenAI CLIP ViT-L/14's text tower
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
    "projection_dim": 768, "hidden_act": "quick_gelu",
}
OPENCLIP_BIGG_CONFIG = {  # text_encoder_2: OpenCLIP ViT-bigG/14's text tower, with its projection
    "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
    "projection_dim": 1280, "hidden_act": "gelu",
}
# Parameter counts of the published weights, checked against the built modules (tests).
SDXL_PARAMETERS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840}


def meta_sdxl_components(dtype: torch.dtype = torch.float32) -> SDXLComponents:
    """SDXL's modules on the meta device (shapes and dtypes, no storage), with its tokenizers."""
    text = {"vocab_size": 49408, "max_position_embeddings": 77, "torch_dtype": dtype}
    with torch.device("meta"):
        components = SDXLComponents(
            unet=UNet2DConditionModel.from_config(SDXL_UNET_CONFIG),
            vae=AutoencoderKL.from_config(SDXL_VAE_CONFIG),
            text_encoder=CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG, **text)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG_CONFIG, **text)),
            tokenizer=offline_clip_tokenizer(),
            tokenizer_2=offline_clip_tokenizer(pad_token="!"),
            scheduler_config=dict(SDXL_SCHEDULER_CONFIG),
            force_zeros_for_empty_prompt=True,
        )
    for model in (components.unet, components.vae, components.text_encoder, components.text_encoder_2):
        cast(model, dtype)
    return components
