"""Pixels <-> SDXL latents through the AutoencoderKL, with its scaling (and shift) factor."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def vae_scale_factor(vae_config) -> int:
    """Pixels per latent pixel: 2 per down block after the first (8 for SDXL, 4 for the toy VAE)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


@torch.no_grad()
def encode_images(vae: AutoencoderKL, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, 3, R, R) in [-1, 1] -> scaled latents x0 (B, 4, R/f, R/f), float32, a posterior sample."""
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    # Contiguous: on the CPU the encoder's convolutions return channels-last tensors, and the noise
    # drawn with randn_like(x0) then lands on other elements than for the same latents in the usual
    # layout (a GPU's, or a latent cache's: data/latent_cache.py).
    return ((latents - shift) * vae.config.scaling_factor).float().contiguous()


@torch.no_grad()
def encode_posterior(vae: AutoencoderKL, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, R, R) in [-1, 1] -> the VAE posterior's mean and log-variance (B, 4, R/f, R/f), float32,
    unscaled (what a latent cache stores; `sample_latents` draws x0 from them)."""
    posterior = vae.encode(pixel_values.to(vae.dtype)).latent_dist
    return posterior.mean.float().contiguous(), posterior.logvar.float().contiguous()


def sample_latents(mean: torch.Tensor, logvar: torch.Tensor, vae_config, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled x0 from a posterior, as diffusers' `latent_dist.sample()` draws it: mean + std * noise
    (`noise`: standard normal like `mean`, drawn here when None), then shifted and scaled."""
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
    latents = mean + std * (torch.randn_like(mean) if noise is None else noise)
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae_config.scaling_factor).float()


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images (B, 3, R, R) in [0, 1], float32."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    images = vae.decode((latents / vae.config.scaling_factor + shift).to(vae.dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1)
