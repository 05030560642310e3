"""Training the toy teacher's AutoencoderKL on toy images (the teacher is a latent diffusion model).

Loss: pixel MSE of the posterior sample's reconstruction plus a small KL to N(0, I), as SD's VAE
without its perceptual and adversarial terms (flat-coloured toy shapes reconstruct sharply from
MSE alone). The scaling factor is then set as SD sets it, 1 / std of the latents (METHOD.md 1's
latents have unit scale).
"""

from __future__ import annotations

import lightning as L
import torch
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader

from lightning_sdxl.data.toy_world import ToyWorld


class AutoencoderModule(L.LightningModule):
    """Reconstruction + KL training of a diffusers AutoencoderKL.

    Args:
        vae: the autoencoder to train (in place).
        lr: AdamW learning rate (cosine-decayed to 0 over `total_steps`).
        kl_weight: weight of the KL term (per latent element) against the pixel MSE.
        total_steps: length of the LR schedule.
    """

    def __init__(self, vae: AutoencoderKL, lr: float = 1e-3, kl_weight: float = 1e-4, total_steps: int = 1000):
        super().__init__()
        self.vae = vae
        self.lr, self.kl_weight, self.total_steps = lr, kl_weight, total_steps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        pixels = batch["pixel_values"]  # (B, 3, R, R) in [-1, 1]
        posterior = self.vae.encode(pixels).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        mse = torch.mean((reconstruction - pixels) ** 2)
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        self.log_dict({"vae/mse": mse, "vae/kl": kl}, prog_bar=True)
        return mse + self.kl_weight * kl

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.lr, total_steps=self.total_steps, pct_start=0.05
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def latent_std(vae: AutoencoderKL, world: ToyWorld, num_images: int = 512) -> float:
    """Standard deviation of posterior samples over `num_images` items of `world`."""
    pixels = torch.stack([world[i]["pixel_values"] for i in range(num_images)])
    return float(vae.encode(pixels).latent_dist.sample().std())


def train_autoencoder(
    vae: AutoencoderKL, world: ToyWorld, steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0
) -> AutoencoderKL:
    """Train `vae` on `world` for `steps` batches, then set its scaling factor to 1 / latent std."""
    L.seed_everything(seed, workers=True)
    module = AutoencoderModule(vae.train(), lr=lr, total_steps=steps)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, gradient_clip_val=1.0, deterministic=False,
    )
    trainer.fit(module, DataLoader(world, batch_size=batch_size, shuffle=False, drop_last=True))
    vae = module.vae.eval().requires_grad_(False)
    std = latent_std(vae, ToyWorld(world.resolution, seed=world.seed + 1, world=world.world))
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return vae
