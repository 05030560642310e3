"""Diffusion maths against diffusers' schedulers (METHOD.md 1-2)."""

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from lightning_sdxl.diffusion.prediction import PREDICTIONS, get_prediction
from lightning_sdxl.diffusion.schedule import CLEAN, NoiseSchedule, jump_path, trailing_timesteps
from lightning_sdxl.diffusion.solver import move
from lightning_sdxl.models.tiny import SDXL_SCHEDULER_CONFIG


@pytest.fixture(scope="module")
def schedule():
    return NoiseSchedule.from_scheduler_config(SDXL_SCHEDULER_CONFIG)


def trailing_euler(num_steps):
    scheduler = EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG, timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    return scheduler


def test_alphas_cumprod_are_sdxl(schedule):
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    expected = np.cumprod(1 - betas)
    assert np.allclose(schedule.alphas_cumprod[1:].numpy(), expected, rtol=1e-5)
    assert schedule.alpha(torch.tensor([CLEAN])).item() == 1.0


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 32, 128])
def test_trailing_grid_equals_diffusers(num_steps):
    expected = trailing_euler(num_steps).timesteps.long()
    assert torch.equal(trailing_timesteps(num_steps), expected)


def test_trailing_grid_examples():
    assert trailing_timesteps(1).tolist() == [999]
    assert trailing_timesteps(2).tolist() == [999, 499]
    assert trailing_timesteps(4).tolist() == [999, 749, 499, 249]
    assert trailing_timesteps(8).tolist()[:2] == [999, 874] and trailing_timesteps(8)[-1] == 124


@pytest.mark.parametrize("teacher_steps,student_steps", [(128, 32), (32, 8), (8, 4), (4, 2), (2, 1)])
def test_jump_path_follows_teacher_grid(teacher_steps, student_steps):
    """Each student step spans exactly n consecutive teacher grid steps (grids nest)."""
    n = teacher_steps // student_steps
    from lightning_sdxl.diffusion.schedule import trailing_positions

    starts = trailing_positions(student_steps)
    path = jump_path(starts, 1000 / student_steps, n)  # (n + 1, B)
    teacher = torch.cat([trailing_timesteps(teacher_steps), torch.tensor([CLEAN])])
    for k in range(student_steps):
        assert path[:, k].tolist() == teacher[k * n : k * n + n + 1].tolist()


def test_jump_path_multi_timestep_starts():
    starts = torch.tensor([250.0, 500.0, 750.0, 1000.0], dtype=torch.float64)
    path = jump_path(starts, 1000.0, 2)  # 2 to 1: every start jumps to clean in 2 teacher steps
    assert path[:, 3].tolist() == [999, 499, CLEAN]
    assert path[:, 2].tolist() == [749, 374, CLEAN]
    path = jump_path(starts, 500.0, 2)  # 4 to 2: 749 -> 249, and 249 -> clean (clamped)
    assert path[:, 2].tolist() == [749, 499, 249]
    assert path[:, 0].tolist() == [249, 124, CLEAN]


@pytest.mark.parametrize("name", sorted(PREDICTIONS))
def test_prediction_round_trip(schedule, name):
    prediction = get_prediction(name)
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 3, 4, 4, 4, generator=generator).unbind(0)
    t = torch.tensor([10, 500, 998])[:, None].expand(-1, 1).reshape(-1)[:3]
    x0, eps = x0[:1].expand(3, -1, -1, -1), eps[:1].expand(3, -1, -1, -1)
    a_t = schedule.alpha(t)
    x_t = schedule.diffuse(x0, eps, t)
    u = prediction.target(x_t, x0, eps, a_t)
    x0_hat, eps_hat = prediction.to_x0_eps(x_t, u, a_t)
    assert torch.allclose(x0_hat, x0, atol=1e-3) and torch.allclose(eps_hat, eps, atol=1e-4)


def test_unknown_prediction_is_a_clear_error():
    with pytest.raises(ValueError, match="choose one of"):
        get_prediction("x0")


def test_forward_process_pure_noise_at_last_timestep(schedule):
    x0, eps = torch.ones(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    x_t = schedule.forward_process(x0, eps, torch.tensor([999, 998]))
    a_999 = schedule.alpha(torch.tensor([999]))[0]
    assert torch.allclose(x_t[0], (1 - a_999).sqrt() * eps[0])  # no signal leak
    assert not torch.allclose(x_t[1], eps[1])
    assert torch.equal(schedule.forward_process(x0, eps, torch.tensor([CLEAN, CLEAN])), x0)


@pytest.mark.parametrize("num_steps", [1, 2, 4, 8, 32])
def test_move_equals_euler_trailing_step(schedule, num_steps):
    """Every step of a trailing Euler solve equals `move` for epsilon prediction."""
    euler = trailing_euler(num_steps)
    prediction = get_prediction("epsilon")
    generator = torch.Generator().manual_seed(num_steps)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    x_sigma = noise * euler.init_noise_sigma  # the pipeline's initial latents
    x_vp = schedule.pure_noise(noise)
    assert torch.allclose(x_vp, x_sigma * schedule.alpha(torch.tensor([999])).sqrt(), atol=1e-6)
    path = torch.cat([trailing_timesteps(num_steps), torch.tensor([CLEAN])])
    for i, t in enumerate(euler.timesteps):
        u = torch.randn(2, 4, 8, 8, generator=generator)  # any model output
        euler.scale_model_input(x_sigma, t)
        x_sigma = euler.step(u, t, x_sigma).prev_sample
        t_cur, t_next = path[i].expand(2), path[i + 1].expand(2)
        x_vp = move(schedule, prediction, x_vp, u, t_cur, t_next)
        # Euler keeps x in sigma space: x_vp = x_sigma * sqrt(a_t').
        assert torch.allclose(x_vp, x_sigma * schedule.alpha(t_next).sqrt(), atol=1e-4, rtol=1e-4)


def test_stage_grid_draws_the_pure_noise_start_as_weighted():
    from lightning_sdxl.diffusion.stage_grid import StageGrid

    generator = torch.Generator().manual_seed(0)
    uniform = StageGrid(2, 1, [249, 499, 749, 999])
    weighted = StageGrid(2, 1, [249, 499, 749, 999], pure_noise_weight=5.0)
    starts = lambda grid: grid.draw(40_000, generator)[0]
    assert abs((starts(uniform) == 999).float().mean().item() - 1 / 4) < 0.01
    drawn = starts(weighted)
    assert abs((drawn == 999).float().mean().item() - 5 / 8) < 0.01  # 5 : 1 : 1 : 1
    assert abs((drawn == 249).float().mean().item() - 1 / 8) < 0.01
    # The student's own grid (4 to 2: starts 999 and 499) takes the weight too.
    assert abs((starts(StageGrid(4, 2, pure_noise_weight=3.0)) == 999).float().mean().item() - 3 / 4) < 0.01
    with pytest.raises(ValueError, match="must include t = 999"):
        StageGrid(2, 1, [249, 499], pure_noise_weight=2.0)
