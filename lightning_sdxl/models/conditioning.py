"""SDXL text and micro-conditioning (SDXL paper, section 2.2; diffusers' `encode_prompt`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SDXLCondition:
    """Everything the SDXL UNet is conditioned on, batched.

    Attributes:
        prompt_embeds: (B, 77, D1 + D2) penultimate hidden states of both text encoders, concatenated.
        pooled_prompt_embeds: (B, P) text encoder 2's pooled projection.
        add_time_ids: (B, 6) original (h, w), crop top-left (top, left), target (h, w).
    """

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    add_time_ids: torch.Tensor

    @property
    def unet_kwargs(self) -> dict:
        """Keyword arguments of `UNet2DConditionModel.forward` (besides sample and timestep)."""
        return {
            "encoder_hidden_states": self.prompt_embeds,
            "added_cond_kwargs": {"text_embeds": self.pooled_prompt_embeds, "time_ids": self.add_time_ids},
        }

    def to(self, *args) -> SDXLCondition:
        """The same condition in another dtype and/or on another device (`Tensor.to`'s arguments; text
        encoders may run in bf16, the UNet in fp32)."""
        return SDXLCondition(
            self.prompt_embeds.to(*args), self.pooled_prompt_embeds.to(*args), self.add_time_ids.to(*args)
        )

    def cat(self, other: SDXLCondition) -> SDXLCondition:
        """Batch two conditions along dim 0 (e.g. uncond and cond for one CFG forward)."""
        return SDXLCondition(
            torch.cat([self.prompt_embeds, other.prompt_embeds]),
            torch.cat([self.pooled_prompt_embeds, other.pooled_prompt_embeds]),
            torch.cat([self.add_time_ids, other.add_time_ids]),
        )

    def repeat(self, times: int) -> SDXLCondition:
        """The same condition `times` over along the batch (real and fake judged in one batch)."""
        return SDXLCondition(
            self.prompt_embeds.repeat(times, 1, 1),
            self.pooled_prompt_embeds.repeat(times, 1),
            self.add_time_ids.repeat(times, 1),
        )

    def index(self, rows: torch.Tensor) -> SDXLCondition:
        """The condition's rows `rows` (B',) in that order (e.g. captions rolled onto other samples)."""
        return SDXLCondition(self.prompt_embeds[rows], self.pooled_prompt_embeds[rows], self.add_time_ids[rows])
