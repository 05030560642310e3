"""Distillation losses: MSE, non-saturating adversarial, multi-timestep re-noising (METHOD.md 2-3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightning_sdxl.batch_randomness import BatchRandomness
from lightning_sdxl.diffusion.schedule import NoiseSchedule


@dataclass(frozen=True)
class LossKind:
    """What a `loss=` choice trains with.

    Attributes:
        adversarial: a discriminator and its optimizer (two optimizer steps per batch).
        conditional: the discriminator also sees x_t, where the jump started (METHOD.md 3, phase a).
        regression: the generator's loss includes the MSE to the teacher's x_{t'} (METHOD.md 2, 7).
    """

    adversarial: bool
    conditional: bool
    regression: bool


# The one list of losses; everything else (config checks, step counts, the module) reads it.
LOSS_KINDS: dict[str, LossKind] = {
    "mse": LossKind(adversarial=False, conditional=False, regression=True),
    "cond_adv": LossKind(adversarial=True, conditional=True, regression=False),
    "uncond_adv": LossKind(adversarial=True, conditional=False, regression=False),
    # MSE + lambda x unconditional adversarial: Hyper-SD's mixed distance (METHOD.md 7). Not
    # SDXL-Lightning's objective: a labelled, stabilised arm beside it.
    "mse_adv": LossKind(adversarial=True, conditional=False, regression=True),
}
ADVERSARIAL_LOSSES = tuple(name for name, kind in LOSS_KINDS.items() if kind.adversarial)


def mse_loss(x_next_student: torch.Tensor, x_next_teacher: torch.Tensor) -> torch.Tensor:
    """Stage 128 to 32: ||x_{t'}^student - x_{t'}^teacher||^2 (METHOD.md 2, step 5)."""
    return F.mse_loss(x_next_student.float(), x_next_teacher.float())


def discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """L_D = softplus(-l_real) + softplus(l_fake) = -log p - log(1 - p_hat) (METHOD.md 3)."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating L_G = softplus(-l_fake) = -log p_hat (METHOD.md 3)."""
    return F.softplus(-logits_fake.float()).mean()


class Renoiser:
    """Multi-timestep discrimination: re-noise clean x0's to t* before judging (METHOD.md 3).

    When t' is clean, the teacher's and the student's x0 are re-noised with the same noise to a
    t* drawn per sample from `timesteps` with probabilities proportional to `weights`.

    Args:
        timesteps: candidate t*, e.g. (10, 250, 500, 750).
        weights: relative weights, e.g. (1, 1, 1, 1) or (5, 1, 1, 1) once training is stable.
    """

    def __init__(self, timesteps: list[int], weights: list[float]):
        if len(timesteps) != len(weights) or not timesteps:
            raise ValueError(
                f"loss.renoise_timesteps {timesteps} and loss.renoise_weights {weights} must be "
                "non-empty and of equal length."
            )
        if min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"loss.renoise_weights {weights} must be non-negative with a positive sum.")
        self.timesteps = torch.tensor(timesteps, dtype=torch.long)
        self.probabilities = torch.tensor(weights, dtype=torch.float) / sum(weights)

    def draw(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) re-noising timesteps t*."""
        index = torch.multinomial(self.probabilities, batch, replacement=True, generator=generator)
        return self.timesteps[index].to(device)

    def __call__(
        self,
        schedule: NoiseSchedule,
        x_real: torch.Tensor,
        x_fake: torch.Tensor,
        t_next: torch.Tensor,
        clean: torch.Tensor,
        randomness: BatchRandomness | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Re-noise the samples whose t' is clean; others pass through.

        Args:
            x_real, x_fake: (B, C, H, W) teacher and student x_{t'}.
            t_next: (B,) t'.
            clean: (B,) bool, where t' is clean.
            randomness: the batch's per-sample draws (None: torch's global generator).

        Returns:
            x_real, x_fake, and the timesteps the discriminator judges them at (t* or t').
        """
        randomness = randomness or BatchRandomness(len(x_real))
        t_star = randomness.per_sample(lambda n, generator: self.draw(n, torch.device("cpu"), generator)).to(x_real.device)
        eps = randomness.normal(x_real)
        mask = clean.view(-1, 1, 1, 1)
        x_real = torch.where(mask, schedule.diffuse(x_real, eps, t_star), x_real)
        x_fake = torch.where(mask, schedule.diffuse(x_fake, eps, t_star), x_fake)
        return x_real, x_fake, torch.where(clean, t_star, t_next)
