"""The discrete VP noise schedule, trailing step grids and the t = 999 pure-noise fix (METHOD.md 1)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import nn

CLEAN = -1  # the end of every trajectory: a = 1, forward(x0, eps, CLEAN) = x0


class NoiseSchedule(nn.Module):
    """alphas_cumprod of a scheduler config, indexed by timestep, with a = 1 at `CLEAN`.

    Args:
        alphas_cumprod: (T,) cumulative products a_t for t = 0..T-1.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        super().__init__()
        # Index t + 1, so that CLEAN (-1) reads the a = 1 prepended at index 0.
        padded = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod.double()])
        self.register_buffer("alphas_cumprod", padded.float(), persistent=False)
        self.num_train_timesteps = len(alphas_cumprod)

    @classmethod
    def from_scheduler_config(cls, config: dict) -> NoiseSchedule:
        """Betas as diffusers computes them for this config (SDXL: scaled_linear 0.00085..0.012)."""
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
        scheduler = DDPMScheduler(**{key: config[key] for key in keys if key in config})
        return cls(scheduler.alphas_cumprod)

    @property
    def last_timestep(self) -> int:
        return self.num_train_timesteps - 1

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        """a_t broadcastable against latents: (B,) timesteps -> (B, 1, 1, 1)."""
        return self.alphas_cumprod[t.long() + 1].view(-1, 1, 1, 1)

    def forward_process(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, with no signal at the last timestep (schedule fix).

        SDXL's a_999 is not 0, so x_999 would leak sqrt(a_999) = 0.068 of the image. At t = 999 the
        signal term is dropped: x_999 = sqrt(1 - a_999) eps, exactly what diffusers' trailing Euler
        pipeline feeds the UNet (latents = noise * sigma_max, divided by sqrt(sigma_max^2 + 1) in
        scale_model_input), so training and inference see the same input.
        """
        a_t = self.alpha(t).to(x0.dtype)
        signal = torch.where(t.view(-1, 1, 1, 1) == self.last_timestep, 0.0, a_t.sqrt())
        return signal * x0 + (1 - a_t).sqrt() * eps

    def pure_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """x_999 for a sampler starting from `noise`: the forward process with no signal."""
        last = torch.full((len(noise),), self.last_timestep, device=noise.device)
        return self.forward_process(torch.zeros_like(noise), noise, last)

    def diffuse(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps exactly, as `move` lands (no schedule fix)."""
        a_t = self.alpha(t).to(x0.dtype)
        return a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps


def trailing_positions(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """Unrounded grid positions T = 1000 - k * 1000 / N, k = 0..N-1 (float64, (N,))."""
    return num_train_timesteps - torch.arange(num_steps, dtype=torch.float64) * (
        num_train_timesteps / num_steps
    )


def positions_to_timesteps(positions: torch.Tensor) -> torch.Tensor:
    """round(T) - 1, CLEAN at or below 0 (round half to even, as numpy in diffusers)."""
    return (torch.round(positions) - 1).clamp(min=CLEAN).long()


def trailing_timesteps(num_steps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The trailing grid, e.g. 4 steps: [999, 749, 499, 249] (diffusers' timestep_spacing="trailing")."""
    return positions_to_timesteps(trailing_positions(num_steps, num_train_timesteps))


def jump_path(start_positions: torch.Tensor, jump: float, num_substeps: int) -> torch.Tensor:
    """Timesteps of a jump of `jump` positions from each start, split into equal substeps.

    A student step from position T lands at T - jump (or clean); its teacher walks the same span in
    `num_substeps` steps. On the trailing grids this is exactly the teacher's grid between two
    student grid points (METHOD.md 2: a grid of 32 contains the grid of 8). For multi-timestep
    starts off the grid (e.g. 749 in a 1-step stage) the span is split evenly likewise.

    Args:
        start_positions: (B,) unrounded positions T = t + 1.
        jump: the student's step length in positions, num_train_timesteps / student_steps.
        num_substeps: n, teacher steps per student step.

    Returns:
        (n + 1, B) timesteps from t to t' (CLEAN where the span reaches 0).
    """
    end_positions = (start_positions - jump).clamp(min=0.0)
    fractions = torch.arange(num_substeps + 1, dtype=torch.float64).view(-1, 1) / num_substeps
    positions = start_positions.view(1, -1) - fractions * (start_positions - end_positions).view(1, -1)
    return positions_to_timesteps(positions)
