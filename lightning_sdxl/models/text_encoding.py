"""SDXL prompt encoding: the same tensors as diffusers' `StableDiffusionXLPipeline.encode_prompt`."""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from lightning_sdxl.models.conditioning import SDXLCondition


class SDXLTextEncoder(nn.Module):
    """Both CLIP text encoders of SDXL, with their tokenizers; frozen unless `trainable`.

    Args:
        text_encoder: CLIP ViT-L text model (SDXL's encoder 1).
        text_encoder_2: OpenCLIP bigG text model with projection (encoder 2, gives the pooled embeds).
        tokenizer: tokenizer of encoder 1.
        tokenizer_2: tokenizer of encoder 2.
        zero_empty_prompt: use zeros as the unconditional embedding instead of encoding "", as the
            pipeline does when `force_zeros_for_empty_prompt` is set (SDXL base sets it).
        trainable: train both encoders (a toy teacher from scratch, stage=teacher); distillation
            keeps them frozen.
    """

    def __init__(
        self,
        text_encoder: CLIPTextModel,
        text_encoder_2: CLIPTextModelWithProjection,
        tokenizer: CLIPTokenizer,
        tokenizer_2: CLIPTokenizer,
        zero_empty_prompt: bool = True,
        trainable: bool = False,
    ):
        super().__init__()
        self.trainable = trainable
        self.text_encoder = text_encoder.requires_grad_(trainable).train(trainable)
        self.text_encoder_2 = text_encoder_2.requires_grad_(trainable).train(trainable)
        self.tokenizers = (tokenizer, tokenizer_2)
        self.zero_empty_prompt = zero_empty_prompt
        self._empty: tuple[torch.Tensor, torch.Tensor] | None = None  # "" encoded once per device

    def train(self, mode: bool = True) -> SDXLTextEncoder:
        """Frozen encoders stay in eval mode (no dropout), whatever the trainer asks."""
        return super().train(mode and self.trainable)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode prompts.

        Returns:
            prompt_embeds (B, 77, D1 + D2): penultimate hidden states of both encoders, concatenated.
            pooled_prompt_embeds (B, P): encoder 2's projected pooled output.
        """
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, (self.text_encoder, self.text_encoder_2)):
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids.to(encoder.device)
            output = encoder(ids, output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])  # (B, 77, D_i), penultimate layer
            pooled = output[0]  # for encoder 2: text_embeds (B, P)
        return torch.cat(hidden_states, dim=-1), pooled

    @torch.no_grad()
    def encode_unconditional(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings of the empty prompt (classifier-free guidance's negative), repeated.

        Encoded once and kept: the teacher of stage 128 to 32 needs them at every batch. Trainable
        encoders re-encode "" every call, unless the empty prompt is zeros (independent of weights).
        """
        stale = self.trainable and not self.zero_empty_prompt
        if stale or self._empty is None or self._empty[0].device != self.text_encoder.device:
            prompt_embeds, pooled = self.encode([""])
            if self.zero_empty_prompt:
                prompt_embeds, pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
            self._empty = (prompt_embeds, pooled)
        prompt_embeds, pooled = self._empty
        return prompt_embeds.expand(batch_size, -1, -1), pooled.expand(batch_size, -1)


def add_time_ids(
    original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL micro-conditioning (SDXL paper, section 2.2): (orig_h, orig_w, top, left, tgt_h, tgt_w).

    Args:
        original_size: (B, 2) source image (height, width).
        crop_top_left: (B, 2) crop offset (top, left).
        target_size: (height, width) of the generated image.
    """
    target = torch.tensor(target_size, device=original_size.device).expand_as(original_size)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()  # (B, 6)


def build_condition(
    text_encoder: SDXLTextEncoder,
    prompts: list[str],
    target_size: tuple[int, int],
    original_size: torch.Tensor | None = None,
    crop_top_left: torch.Tensor | None = None,
) -> SDXLCondition:
    """The UNet's full condition for a batch of prompts.

    Args:
        original_size, crop_top_left: (B, 2) each, a training image's source size and crop; None
            (generation) asks for an uncropped image at `target_size`, as diffusers' pipeline does.
    """
    prompt_embeds, pooled = text_encoder.encode(prompts)
    if original_size is None:
        original_size = torch.tensor(target_size, device=prompt_embeds.device).expand(len(prompts), 2)
        crop_top_left = torch.zeros_like(original_size)
    time_ids = add_time_ids(original_size, crop_top_left, target_size).to(prompt_embeds)
    return SDXLCondition(prompt_embeds, pooled, time_ids)


def unconditional_like(text_encoder: SDXLTextEncoder, condition: SDXLCondition) -> SDXLCondition:
    """The empty-prompt condition with the same micro-conditioning as `condition`."""
    prompt_embeds, pooled = text_encoder.encode_unconditional(len(condition.add_time_ids))
    return SDXLCondition(prompt_embeds, pooled, condition.add_time_ids)
