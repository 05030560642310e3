"""Hyper-SD's TSCD (METHOD.md 7): trajectory segments, the EMA target network, the consistency jump."""

from __future__ import annotations

import statistics

import pytest
import torch
from torch import nn

from lightning_sdxl.diffusion.schedule import CLEAN
from lightning_sdxl.diffusion.segments import TrajectorySegments
from lightning_sdxl.models.ema import EMAWeights


@pytest.mark.parametrize(("segments", "teacher_steps"), [(8, 32), (4, 32), (2, 8), (1, 4)])
def test_every_jump_stays_in_its_segment_and_ends_at_its_boundary(segments, teacher_steps):
    grid = TrajectorySegments(segments, teacher_steps)
    t, t_mid, t_end = grid.draw(4000, torch.Generator().manual_seed(0))
    boundaries = [round(1000 - j * 1000 / segments) - 1 for j in range(segments)] + [CLEAN]  # trailing grid
    teacher_grid = {round(1000 - j * 1000 / teacher_steps) - 1 for j in range(teacher_steps)}
    assert set(t.tolist()) == teacher_grid  # every teacher grid point is drawn
    for start, middle, end in zip(t.tolist(), t_mid.tolist(), t_end.tolist()):
        assert end == max(b for b in boundaries if b < start)  # the first boundary below t
        assert end <= middle < start  # one teacher step, never past the end
    if segments == 1:
        assert (t_end == CLEAN).all()


def test_segments_must_divide_the_teacher_grid():
    with pytest.raises(ValueError, match="divide"):
        TrajectorySegments(3, 32)


def test_the_ema_averages_and_stands_in_for_the_trainable_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)  # as a LoRA student's frozen base
    ema = EMAWeights(model, decay=0.9)
    assert ema.names == ["1.weight", "1.bias"]
    before = model[1].weight.detach().clone()
    with torch.no_grad():
        model[1].weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.averages()[0], 0.9 * before + 0.1 * (before + 1.0))
    x = torch.randn(5, 3)
    swapped = nn.Sequential(model[0], nn.Linear(3, 1))
    with torch.no_grad():
        swapped[1].weight.copy_(ema.averages()[0]), swapped[1].bias.copy_(ema.averages()[1])
    torch.testing.assert_close(ema.call(model, x), swapped(x))
    assert torch.equal(model[1].weight, before + 1.0)  # the online weights are untouched


def consistency_gaps(module, segments: int, count: int = 16) -> tuple[float, float]:
    """Two mean squared distances in the first segment (t = 999 down to its end), over toy prompts
    and seeded noise: between the student's maps to the segment's end from two points of one teacher
    trajectory (x_999 and the point 2 teacher steps on), and between the map from x_999 and where the
    teacher's own ODE lands at the end (so a collapse to a constant would not pass as consistency)."""
    from lightning_sdxl.data.toy_world import ToyWorld
    from lightning_sdxl.diffusion.solver import move, solve

    grid = TrajectorySegments(segments, module.stage.teacher_steps)
    teacher_path = torch.tensor([round(1000 - j * grid.teacher_step) - 1 for j in range(grid.teacher_steps // segments)]
                                + [round(1000 - 1000 / segments) - 1 if segments > 1 else CLEAN])
    start, middle, end = teacher_path[0], teacher_path[2], teacher_path[-1]
    prompts = [ToyWorld(32, seed=7, world="simple").scene(i).caption for i in range(count)]
    torch.manual_seed(0)
    with torch.no_grad():
        condition = module.condition(prompts)
        x_a = module.schedule.pure_noise(torch.randn(count, 4, module.latent_size, module.latent_size))
        with module.pair.teacher_mode():
            x_b = solve(module.pair.teacher, module.schedule, module.teacher_prediction, x_a, teacher_path[:3], condition)
            x_end = solve(module.pair.teacher, module.schedule, module.teacher_prediction, x_a, teacher_path, condition)
        maps = []
        for x, t in ((x_a, start), (x_b, middle)):
            t = t.expand(count)
            u = module.pair.student(x, t, condition)
            maps.append(move(module.schedule, module.student_prediction, x, u, t, end.expand(count)))
    return torch.mean((maps[0] - maps[1]) ** 2).item(), torch.mean((maps[0] - x_end) ** 2).item()


@pytest.mark.slow  # two 60-batch toy runs, ~37 s: in `pytest -m slow`, which CI runs
@pytest.mark.parametrize("target", ["ema", "online"])
def test_a_short_tscd_run_brings_a_segment_s_maps_together(tmp_path, target):
    """Issue 16's check: after a short run on the toy, the student's maps from two points of one
    segment land closer to the segment's end than before training (the median of five seeds: one
    60-batch run varies with its draws, the online target's most)."""
    import hydra
    from conftest import compose_config

    from lightning_sdxl.train import train

    overrides = ["stage=tscd", "stage.segments=2", f"stage.consistency_target={target}", "loss=mse",
                 "student.lr=3e-4", "steps=60", "validation.every_n_steps=60", "checkpoint.every_n_steps=60",
                 "logger=none", "callbacks.export.single_file=false", "trainer.enable_progress_bar=false"]
    before, runs = None, []
    for seed in range(5):
        cfg = compose_config([*overrides, f"seed={seed}"], tmp_path / f"run{seed}", shrink=False)
        before = before or consistency_gaps(hydra.utils.instantiate(cfg.module).eval(), segments=2)
        runs.append(consistency_gaps(train(cfg).lightning_module.eval(), segments=2))
    after = [statistics.median(gaps) for gaps in zip(*runs)]
    # Measured (online, seeds 0-4, 60 batches; before: maps 0.035 apart, 0.040 from the teacher's end):
    # maps 0.020 / 0.007 / 0.004 / 0.010 / 0.007 apart, 0.042 / 0.038 / 0.019 / 0.019 / 0.013 from the
    # teacher's end; seeds 5-7 gave 0.058, 0.015 and 0.033 (per-rank streams before batch_randomness.py
    # gave 0.050 at seed 3: single runs fail either way).
    assert after[0] < 0.5 * before[0], (before, runs)
    assert after[1] < before[1], (before, runs)  # and closer to the teacher's own end, not collapsed


def test_tscd_with_the_adversarial_mix_trains_checkpoints_its_ema_and_exports(make_config, tmp_path):
    """loss=mse_adv on a TSCD stage (the tiny model): both optimizers step, the EMA target is in
    the checkpoint (exact resume), and the export names the stage."""
    import json

    from lightning_sdxl.train import train

    cfg = make_config("stage=tscd", "stage.segments=2", "stage.teacher_steps=4", "loss=mse_adv")
    trainer = train(cfg)
    assert trainer.global_step == 4  # 2 batches x (generator + discriminator)
    state = torch.load(f"{cfg.output_dir}/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    module = trainer.lightning_module
    ema_keys = {key for key in state if key.startswith("ema.")}
    assert len(ema_keys) == len(module.ema.names) > 0
    online = dict(module.pair.unet.named_parameters())
    assert any(not torch.equal(average, online[name].detach().float())  # updated, lagging the student
               for name, average in zip(module.ema.names, module.ema.averages()))
    assert any(key.startswith("discriminator.") for key in state)
    info = json.loads((tmp_path / "run" / "export" / "export_info.json").read_text())
    assert info["stage"].startswith("tscd2") and info["consistency_target"] == "ema"


@pytest.mark.parametrize("target", ["ema", "online"])
def test_the_target_network_skips_rows_already_at_their_segment_end(make_config, tiny_sdxl_path, target):
    """Rows whose teacher step reaches the segment's end take x_{t_mid} itself as target, so the
    target network runs only on the others: the same jump as running it on every row (FSDP's way)."""
    import hydra
    from omegaconf import open_dict

    cfg = make_config("stage=tscd", "stage.segments=2", "stage.teacher_steps=4", "loss=mse",
                      f"stage.consistency_target={target}")
    with open_dict(cfg):
        cfg.model.path = tiny_sdxl_path
    module = hydra.utils.instantiate(cfg.module)
    x0 = torch.randn(8, 4, module.latent_size, module.latent_size)
    condition = module.condition(["a red circle"] * 8)
    calls, unet_forward = [], module.pair.unet.forward
    module.pair.unet.forward = lambda sample, *args, **kwargs: calls.append(len(sample)) or unet_forward(sample, *args, **kwargs)
    jumps = []
    for sharded in (False, True):
        module.sharded = sharded
        torch.manual_seed(3)
        calls.clear()
        with torch.no_grad():
            jumps.append(module.consistency_jump(x0, condition))
        jumps[-1].calls = list(calls)
    skipped, every = jumps
    torch.testing.assert_close(skipped.x_next_real, every.x_next_real, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(skipped.x_next_fake, every.x_next_fake, rtol=1e-5, atol=1e-6)
    # k = 2 over 4 teacher steps: starts 749 and 249 reach their end in one teacher step. The UNet
    # (teacher, target and student for a LoRA student) saw fewer rows when the target skipped them.
    assert sum(skipped.calls) < sum(every.calls)
