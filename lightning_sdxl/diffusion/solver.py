"""The deterministic DDIM step (`move`) and n-step solves along a timestep path (METHOD.md 1-2)."""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import torch

from lightning_sdxl.diffusion.prediction import Prediction
from lightning_sdxl.diffusion.schedule import NoiseSchedule
from lightning_sdxl.models.conditioning import SDXLCondition

# model_fn(x_t, t, condition) -> u, the raw model output.
ModelFn = Callable[[torch.Tensor, torch.Tensor, SDXLCondition], torch.Tensor]


def move(
    schedule: NoiseSchedule,
    prediction: Prediction,
    x_t: torch.Tensor,
    u: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
) -> torch.Tensor:
    """move(x_t, u, t, t') = forward(x0_hat, eps_hat, t'): one DDIM (eta = 0) step.

    For epsilon prediction it equals diffusers' EulerDiscreteScheduler step between t and t'.
    """
    x0_hat, eps_hat = prediction.to_x0_eps(x_t, u, schedule.alpha(t).to(x_t.dtype))
    return schedule.diffuse(x0_hat, eps_hat, t_next)


def guided_output(
    model_fn: ModelFn,
    x_t: torch.Tensor,
    t: torch.Tensor,
    condition: SDXLCondition,
    uncondition: SDXLCondition | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Model output with classifier-free guidance, cond and uncond batched in one forward."""
    if uncondition is None or guidance_scale <= 1.0:
        return model_fn(x_t, t, condition)
    u_uncond, u_cond = model_fn(torch.cat([x_t, x_t]), torch.cat([t, t]), uncondition.cat(condition)).chunk(2)
    return u_uncond + guidance_scale * (u_cond - u_uncond)


def solve(
    model_fn: ModelFn,
    schedule: NoiseSchedule,
    prediction: Prediction,
    x_t: torch.Tensor,
    path: torch.Tensor,
    condition: SDXLCondition,
    uncondition: SDXLCondition | None = None,
    guidance_scale: float = 1.0,
) -> torch.Tensor:
    """Move x_t along `path` ((n + 1,) or (n + 1, B) timesteps), one model call per step.

    The teacher's n-step solve in a stage and the N-step sampler are both this function.
    """
    batch = len(x_t)
    path = path.to(x_t.device)
    if path.ndim == 1:
        path = path.view(-1, 1).expand(-1, batch)
    for t, t_next in pairwise(path):
        u = guided_output(model_fn, x_t, t, condition, uncondition, guidance_scale)
        x_t = move(schedule, prediction, x_t, u, t, t_next)
    return x_t


def unet_fn(unet: torch.nn.Module) -> ModelFn:
    """Wrap a diffusers UNet2DConditionModel as model_fn(x_t, t, condition) -> u."""

    def model_fn(x_t: torch.Tensor, t: torch.Tensor, condition: SDXLCondition) -> torch.Tensor:
        return unet(x_t, t, **condition.unet_kwargs, return_dict=False)[0]

    return model_fn
