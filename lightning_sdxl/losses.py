"""Distillation losses: MSE, non-saturating adversarial, multi-timestep re-noising (METHOD.md 2-3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_sdxl.batch_randomness import BatchRandomness
from lightning_sdxl.diffusion.schedule import NoiseSchedule


class DistillationLoss:
    """A `loss=` choice (conf/loss/): what the generator and the discriminator minimise, whether a
    discriminator trains (and so how many optimizers a batch steps) and its re-noiser.

    Args:
        name: the choice's name (run folders, exports, resume checks).
        regression: the generator's loss includes the MSE to the teacher's x_{t'} (METHOD.md 2, 7).
        adversarial: a discriminator and its optimizer (two optimizer steps per batch, METHOD.md 3).
        conditional: the discriminator also sees x_t, where the jump started (METHOD.md 3, phase a).
        adversarial_weight: lambda of MSE + lambda x adversarial when both terms train (mse_adv,
            Hyper-SD's mixed distance, METHOD.md 7).
        renoise_timesteps: t* for multi-timestep discrimination when t' is clean. The MSE loss's file
            has none; a preset that sets them for every loss (experiment=toy) leaves it unchanged.
        renoise_weights: relative weights of `renoise_timesteps`.
        adam_betas: the optimizers' betas for this loss (METHOD.md 2: (0.9, 0.999) for MSE, (0, 0.99)
            adversarial); conf/optim/ reads them.
    """

    def __init__(
        self,
        name: str,
        regression: bool,
        adversarial: bool,
        conditional: bool = False,
        adversarial_weight: float | None = None,
        renoise_timesteps: list[int] | None = None,
        renoise_weights: list[float] | None = None,
        adam_betas: tuple[float, float] = (0.9, 0.999),
    ):
        if not (regression or adversarial):
            raise ValueError(f"loss={name}: set regression or adversarial (or both).")
        if conditional and not adversarial:
            raise ValueError(f"loss={name}: conditional needs adversarial (it is the discriminator's input).")
        if adversarial and (renoise_timesteps is None or renoise_weights is None):
            raise ValueError(f"loss={name}: an adversarial loss needs renoise_timesteps and renoise_weights.")
        if adversarial_weight is not None and not (regression and adversarial):
            raise ValueError(f"loss={name}: adversarial_weight weighs the adversarial term beside the MSE; only loss=mse_adv has both.")
        self.name, self.regression, self.adversarial, self.conditional = name, regression, adversarial, conditional
        self.adversarial_weight = 1.0 if adversarial_weight is None else adversarial_weight
        self.adam_betas = tuple(adam_betas)
        self.renoiser = Renoiser(list(renoise_timesteps), list(renoise_weights)) if adversarial else None

    @property
    def optimizers_per_batch(self) -> int:
        """Optimizers a batch steps: the generator's, and the discriminator's when adversarial."""
        return 2 if self.adversarial else 1

    def regression_term(self, x_next_fake: torch.Tensor, x_next_real: torch.Tensor) -> torch.Tensor | None:
        """The generator's MSE to the teacher's x_{t'} (METHOD.md 2, step 5), None when not regressing."""
        return mse_loss(x_next_fake, x_next_real) if self.regression else None

    def adversarial_term(self, logits_fake: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weighted, plain) generator adversarial loss (METHOD.md 3), x lambda beside the MSE (METHOD.md 7)."""
        plain = generator_loss(logits_fake)
        return (self.adversarial_weight * plain if self.regression else plain), plain

    def discriminator_loss(self, logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
        """L_D over the real and the fake rows (METHOD.md 3)."""
        return discriminator_loss(logits_real, logits_fake)


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
