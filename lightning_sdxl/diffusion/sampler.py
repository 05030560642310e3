"""The N-step sampler: what a distilled model runs at inference (METHOD.md 5)."""

from __future__ import annotations

import torch

from lightning_sdxl.diffusion.prediction import Prediction
from lightning_sdxl.diffusion.schedule import CLEAN, NoiseSchedule, trailing_timesteps
from lightning_sdxl.diffusion.solver import ModelFn, solve
from lightning_sdxl.models.conditioning import SDXLCondition


def sampling_path(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The trailing grid followed by CLEAN: (N + 1,) timesteps."""
    return torch.cat([trailing_timesteps(num_steps, num_train_timesteps), torch.tensor([CLEAN])])


def seeded_noise(seeds: list[int], latent_size: int, device: torch.device) -> torch.Tensor:
    """(B, 4, S, S) noise, one CPU generator per seed: the same image for a seed on any device
    and in any batch."""
    noise = [torch.randn(4, latent_size, latent_size, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    return torch.stack(noise).to(device)


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    prediction: Prediction,
    noise: torch.Tensor,
    num_steps: int,
    condition: SDXLCondition,
    uncondition: SDXLCondition | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Latents x0 after `num_steps` trailing DDIM steps from pure noise (`NoiseSchedule.pure_noise`).

    Equals diffusers' StableDiffusionXLPipeline with EulerDiscreteScheduler(timestep_spacing=
    "trailing") on the same UNet and noise (tests/test_sampler.py).
    """
    path = sampling_path(num_steps, schedule.num_train_timesteps)
    x_t = schedule.pure_noise(noise)
    return solve(model_fn, schedule, prediction, x_t, path, condition, uncondition, guidance_scale)


@torch.no_grad()
def generate(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    prediction: Prediction,
    seeds: list[int],
    latent_size: int,
    num_steps: int,
    condition: SDXLCondition,
    uncondition: SDXLCondition | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Latents x0 of `num_steps` steps from each seed's noise (`seeded_noise`): the one generation
    path of the validation grids (student, teacher, a teacher in training) and eval.py."""
    noise = seeded_noise([int(seed) for seed in seeds], latent_size, condition.add_time_ids.device)
    return sample(model_fn, schedule, prediction, noise, num_steps, condition, uncondition, guidance_scale)
