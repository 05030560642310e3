"""One training batch of the LightningModule: what each phase may and may not change."""

from __future__ import annotations

import json
from collections import deque

import hydra
import lightning as L
import pytest
import torch
from omegaconf import open_dict

from lightning_sdxl.data import ToyWorldDataModule
from lightning_sdxl.diffusion.schedule import CLEAN
from lightning_sdxl.export import export_student


def build_module(make_config, tiny_sdxl_path, *overrides):
    cfg = make_config(*overrides)
    with open_dict(cfg):
        cfg.model.path = tiny_sdxl_path
    return hydra.utils.instantiate(cfg.module), cfg


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {name for name, tensor in module.state_dict().items() if not torch.equal(before[name], tensor)}


def run_one_batch(module, cfg) -> None:
    """Fit exactly one batch through a real Trainer (manual optimization, toggling, clipping)."""
    data = ToyWorldDataModule(resolution=cfg.data.resolution, batch_size=2, num_val_prompts=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=module.optimizers_per_batch, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)


@pytest.mark.parametrize(
    "loss,student", [("cond_adv", "lora"), ("uncond_adv", "full"), ("mse", "lora"), ("mse_adv", "lora")]
)
def test_each_phase_changes_only_its_own_weights(make_config, tiny_sdxl_path, loss, student):
    module, cfg = build_module(make_config, tiny_sdxl_path, f"loss={loss}", f"student={student}", "student.lr=1e-3")
    before = snapshot(module)
    teacher_keys = {k for k in before if k.startswith("pair.teacher_unet.")} | {
        k for k in before if k.startswith("pair.unet.") and "lora_" not in k and student == "lora"
    }
    frozen_keys = {k for k in before if k.startswith(("vae.", "text_encoder."))} | teacher_keys
    student_keys = {name for name, p in module.named_parameters() if p.requires_grad and name.startswith("pair.")}
    discriminator_keys = {k for k in before if k.startswith("discriminator.")}

    run_one_batch(module, cfg)
    moved = changed(before, module)

    assert not moved & frozen_keys, "the teacher, VAE or text encoders changed"
    assert moved & student_keys, "the student did not train"
    assert moved <= student_keys | discriminator_keys
    if loss == "mse":
        assert module.discriminator is None and not discriminator_keys
    else:
        assert moved & discriminator_keys, "the discriminator did not train"


def test_generator_and_discriminator_steps_are_separate(make_config, tiny_sdxl_path):
    """Within one batch the generator step moves no discriminator weight and vice versa."""
    module, cfg = build_module(make_config, tiny_sdxl_path, "loss=cond_adv", "student.lr=1e-3")
    seen = []

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((optimizer, snapshot(pl_module)))

    data = ToyWorldDataModule(resolution=cfg.data.resolution, batch_size=2, num_val_prompts=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False, callbacks=[Spy()],
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    (_, after_generator_backward), (_, after_generator_step) = seen[0], seen[1]
    moved_by_generator = {k for k in after_generator_step if not torch.equal(after_generator_step[k], after_generator_backward[k])}
    assert moved_by_generator and all(".lora_" in k for k in moved_by_generator), moved_by_generator
    final = snapshot(module)
    moved_by_discriminator = {k for k in final if not torch.equal(final[k], after_generator_step[k])}
    assert moved_by_discriminator and all(k.startswith("discriminator.") for k in moved_by_discriminator)


def test_teacher_output_is_unchanged_by_training(make_config, tiny_sdxl_path):
    module, cfg = build_module(make_config, tiny_sdxl_path, "student.lr=1e-2")
    seeds = torch.tensor([0, 1])
    teacher_before = module.generate(["a red circle", "a blue square"], seeds, "teacher", 2)
    student_before = module.generate(["a red circle", "a blue square"], seeds, "student", 2)
    assert torch.equal(teacher_before, student_before), "a fresh LoRA student must equal its teacher"
    run_one_batch(module, cfg)
    assert torch.equal(module.generate(["a red circle", "a blue square"], seeds, "teacher", 2), teacher_before)
    assert not torch.allclose(module.generate(["a red circle", "a blue square"], seeds, "student", 2), student_before)


def test_a_teacher_solve_toggles_the_adapters_once_with_the_same_target(make_config, tiny_sdxl_path, monkeypatch):
    """stage=8to4: 2 teacher calls per jump. peft walks every module per toggle (SDXL: 9,810)."""
    module, _ = build_module(make_config, tiny_sdxl_path, "stage=8to4", "student.lr=1e-2")
    with torch.no_grad():
        for parameter in module.pair.trainable_parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))  # a student unlike its teacher
    x0, condition = torch.randn(2, 4, 8, 8), module.condition(["a red circle", "a blue square"])
    calls = []
    disable = module.pair.unet.disable_adapters
    monkeypatch.setattr(module.pair.unet, "disable_adapters", lambda: (calls.append(1), disable())[1])
    torch.manual_seed(0)
    jump = module.jump(x0, condition)
    assert len(calls) == 1
    with torch.no_grad():  # the adapters are back on: the student is not the teacher
        t = torch.tensor([999, 999])
        assert not torch.allclose(module.pair.student(x0, t, condition), module.pair.teacher(x0, t, condition))
    calls.clear()
    # The same target as one toggle per call (each teacher call on its own), from the same draw.
    torch.manual_seed(0)
    path = module.stage.draw(2)
    x_t = module.schedule.forward_process(x0, torch.randn_like(x0), path[0])
    assert torch.equal(x_t, jump.x_t)
    from lightning_sdxl.diffusion.solver import solve

    expected = solve(module.pair.teacher, module.schedule, module.teacher_prediction, x_t, path, condition)
    assert len(calls) == 2 and torch.equal(expected, jump.x_next_real)  # one toggle per teacher call


def test_renoising_applies_only_where_the_jump_ends_clean(make_config, tiny_sdxl_path):
    module, _ = build_module(make_config, tiny_sdxl_path, "stage=2to1", "loss=uncond_adv")
    x_real, x_fake = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t_next = torch.tensor([CLEAN, 249, CLEAN, 499])
    real, fake, t_judge = module.loss.renoiser(module.schedule, x_real, x_fake, t_next, t_next == CLEAN)
    assert torch.equal(real[1], x_real[1]) and torch.equal(fake[3], x_fake[3])
    assert set(t_judge[[0, 2]].tolist()) <= {10, 250, 500, 750} and t_judge[1] == 249
    # Same noise for real and fake: their difference shrinks by exactly sqrt(a_t*).
    a = module.schedule.alpha(t_judge[[0, 2]])
    assert torch.allclose(real[[0, 2]] - fake[[0, 2]], a.sqrt() * (x_real - x_fake)[[0, 2]], atol=1e-5)


def test_checkpoint_holds_trainable_weights_only(make_config, tiny_sdxl_path):
    module, _ = build_module(make_config, tiny_sdxl_path)
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    keys = set(checkpoint["state_dict"])
    assert keys == module.trainable_state_keys()
    assert any(".lora_A." in k for k in keys) and any(k.startswith("discriminator.") for k in keys)
    assert not any(k.startswith(("vae.", "text_encoder.")) for k in keys)
    checkpoint["state_dict"].pop(next(iter(sorted(keys))))
    with pytest.raises(KeyError, match="lacks 1 trainable"):
        module.on_load_checkpoint(checkpoint)


@pytest.mark.parametrize("loss,student", [("cond_adv", "lora"), ("uncond_adv", "full")])
def test_every_trainable_weight_gets_optimizer_state_and_moves(make_config, tiny_sdxl_path, loss, student):
    """docs/MEASUREMENTS.md: a submodule can silently never train; check every single weight."""
    module, cfg = build_module(make_config, tiny_sdxl_path, f"loss={loss}", f"student={student}", "student.lr=1e-3")
    trainable = {name: p.detach().clone() for name, p in module.named_parameters() if p.requires_grad}
    data = ToyWorldDataModule(resolution=cfg.data.resolution, batch_size=2, num_val_prompts=2)
    # Two batches: LoRA's A only receives gradient once B has left zero.
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2 * module.optimizers_per_batch, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    parameters = dict(module.named_parameters())
    with_state = {id(p) for optimizer in trainer.optimizers for p in optimizer.state}
    assert {name for name in trainable if id(parameters[name]) not in with_state} == set()
    frozen_still = {name for name, before in trainable.items() if torch.equal(before, parameters[name])}
    # The tiny UNet's 32-channel blocks use GroupNorm(32): one channel per group, so the per-channel
    # shift that time_emb_proj adds before norm2 is normalised away and its gradient is exactly zero
    # (a property of the architecture; they moved before only by float noise, which Adam amplifies).
    # Its LoRA A stays put (at most float noise, RMS gradient < 1e-12, reaches it); all else must move.
    dead = {name for name in frozen_still if ".time_emb_proj." in name and _block_channels(module, name) == 32}
    assert frozen_still - dead == set()
    for name in dead:
        rms_gradient = optimizer_second_moment(trainer, parameters[name]).max().sqrt()
        assert rms_gradient < 1e-12, f"{name} got a real gradient ({rms_gradient:.2e}) but did not move"


def _block_channels(module, name: str) -> int:
    """Output channels of the resnet a parameter name belongs to."""
    resnet = module.get_submodule(name.split(".time_emb_proj.")[0])
    return resnet.norm2.num_channels


def optimizer_second_moment(trainer, parameter) -> torch.Tensor:
    """Adam's running mean of squared gradients of one parameter (zero: it never saw a gradient)."""
    for optimizer in trainer.optimizers:
        if parameter in optimizer.state:
            return optimizer.state[parameter]["exp_avg_sq"]
    raise KeyError("no optimizer state")


# Seed 0 in the default suite, all three in pytest -m slow (20 s each on 2 cores).
@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.slow)])
def test_discriminator_learns_a_known_gap_and_generalises(make_config, tiny_sdxl_path, seed):
    """D's signal on a known gap: fakes are the reals blurred (no fine detail). Trained on fresh
    pairs each step with the module's own loss, D separates held-out pairs it never saw.

    Measured before the head's depth rule (models/discriminator.py): a head ending at 1 x 1 pixels
    stayed at chance on held-out pairs (0.35-0.58); with the rule, 1.0 for every seed tried.
    """
    torch.manual_seed(seed)  # the head's initialisation
    module, _ = build_module(make_config, tiny_sdxl_path, "loss=uncond_adv")
    generator = torch.Generator().manual_seed(seed)

    def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        x_real = torch.randn(n, 4, module.latent_size, module.latent_size, generator=generator)
        return x_real, torch.nn.functional.avg_pool2d(x_real, 3, stride=1, padding=1)  # smooth

    def judge(x_real, x_fake):
        n = len(x_real)
        condition = module.condition(["a red circle"] * n)
        return module.discriminator.judge(x_real, torch.full((n,), 499), [x_real, x_fake], torch.full((n,), 10), condition)

    def accuracy(x_real, x_fake) -> float:
        with torch.no_grad():
            real, fake = judge(x_real, x_fake)
        return ((real > 0).float().mean() + (fake < 0).float().mean()).item() / 2

    held_out = pairs(64)
    before = accuracy(*held_out)
    optimizer = torch.optim.Adam(module.discriminator.parameters(), lr=1e-3, betas=(0.0, 0.99))
    for _ in range(100):
        real, fake = judge(*pairs(16))
        optimizer.zero_grad()
        module.loss.discriminator_loss(real, fake).backward()
        optimizer.step()
    assert abs(before - 0.5) < 0.15, "an untrained head should be near chance"
    assert accuracy(*held_out) >= 0.85


@pytest.mark.slow  # a D trained for ~18 s: in `pytest -m slow`, which CI runs
def test_conditioning_probe_right_pairing_scores_above_wrong_caption_and_wrong_x_t(make_config, tiny_sdxl_path):
    """With `conditioning_fakes`, the conditional D learns the pairing: on held-out samples it scores
    the right (caption, x_t, x_{t'}) above the same x_{t'} with another caption or another x_t."""
    torch.manual_seed(0)
    module, _ = build_module(make_config, tiny_sdxl_path, "loss=cond_adv", "discriminator.conditioning_fakes=true")
    generator = torch.Generator().manual_seed(0)
    prompts = ["a red circle", "a blue square"]
    size = module.latent_size

    def batch(n: int):
        labels = torch.arange(n) % 2  # alternate captions: a roll by one always swaps them
        x_real = torch.randn(n, 4, size, size, generator=generator) * 0.5 + (2 * labels - 1).view(-1, 1, 1, 1)
        t = torch.full((n,), 499)
        x_t = module.schedule.forward_process(x_real, torch.randn(x_real.shape, generator=generator), t)
        return x_real, x_t, t, module.condition([prompts[k] for k in labels])

    optimizer = torch.optim.Adam(module.discriminator.parameters(), lr=1e-3, betas=(0.0, 0.99))
    t_judge = torch.full((8,), 10)
    for _ in range(150):
        x_real, x_t, t, condition = batch(8)
        (real,) = module.discriminator.judge(x_t, t, [x_real], t_judge, condition)
        fakes = module._conditioning_fakes(x_t, t, x_real, t_judge, condition)
        assert len(fakes) == 2  # wrong caption and wrong x_t for the conditional D
        optimizer.zero_grad()
        module.loss.discriminator_loss(real, torch.cat(fakes)).backward()
        optimizer.step()
    with torch.no_grad():
        x_real, x_t, t, condition = batch(16)
        (right,) = module.discriminator.judge(x_t, t, [x_real], t_judge.repeat(2), condition)
        wrong_caption, wrong_start = module._conditioning_fakes(x_t, t, x_real, t_judge.repeat(2), condition)
    # Pair by pair (the same x_{t'} with its own and with a wrong pairing); the margin asks for
    # ordering, not size (after 60 steps one thread count ordered 0.81 of pairs, another all).
    assert (right > wrong_caption).float().mean() >= 0.9 and (right > wrong_start).float().mean() >= 0.9
    assert right.mean() > wrong_caption.mean() + 0.1 and right.mean() > wrong_start.mean() + 0.1


def test_discriminator_warmup_holds_the_generator_and_keeps_the_step_convention(make_config, tiny_sdxl_path, tmp_path):
    module, cfg = build_module(make_config, tiny_sdxl_path, "loss=uncond_adv", "discriminator.warmup=2", "student.lr=1e-3")
    before = snapshot(module)
    data = ToyWorldDataModule(resolution=cfg.data.resolution, batch_size=2, num_val_prompts=2)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=2 * module.optimizers_per_batch, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    moved = changed(before, module)
    assert trainer.global_step == 4 and module.batches_trained == 2  # 2 optimizer steps per batch, as always
    assert moved and all(k.startswith("discriminator.") for k in moved), "only D may train in the warm-up"
    assert module.discriminator_signal is not None and 0 <= module.discriminator_signal["accuracy_last_fifth"] <= 1
    export_student(module, tmp_path / "export", single_file=False)
    info = json.loads((tmp_path / "export" / "export_info.json").read_text())
    assert info["discriminator"] == module.discriminator_signal
    # Per start timestep: a D that sees every t=999 pair and none of the t=249 ones (each called
    # the same, 0.5) is 0.75 overall, 1.0 and 0.5 by start, not "no signal".
    starts, correct = torch.tensor([999, 999, 249, 249]), torch.tensor([1.0, 1.0, 0.5, 0.5])
    # Only the run's last fifth is kept (2 batches planned: a window of 1), not every batch.
    assert module.batches_recorded == 2 and len(module.discriminator_accuracies) == module.discriminator_accuracies.maxlen == 1
    module.discriminator_accuracies, module.batches_recorded = deque([(starts, correct)] * 10), 10
    signal = module.measure_discriminator_signal(gather=False)
    assert signal["accuracy_last_fifth"] == 0.75 and not signal["no_signal"]
    assert signal["accuracy_by_start"]["999"] == 1.0 and signal["accuracy_by_start"]["249"] == 0.5


def test_a_separate_teacher_path_is_the_teacher_and_model_path_the_student(make_config, tiny_sdxl_path, tmp_path):
    """The skip-level teacher (METHOD.md 4): teacher_path's UNet teaches, the student starts at model.path."""
    from lightning_sdxl.models.tiny import ensure_tiny_sdxl

    other = str(ensure_tiny_sdxl(tmp_path / "other-teacher", seed=1))  # same architecture, other weights
    own, _ = build_module(make_config, tiny_sdxl_path, "loss=uncond_adv", "student=lora")
    module, _ = build_module(make_config, tiny_sdxl_path, "loss=uncond_adv", "student=lora", f"teacher_path={other}")
    separate, _ = build_module(make_config, other, "loss=uncond_adv", "student=full")
    with torch.no_grad():
        condition = module.condition(["a red circle", "a blue square"])
    x_t = torch.randn(2, 4, module.latent_size, module.latent_size, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 499])
    with torch.no_grad():
        assert torch.equal(module.pair.teacher(x_t, t, condition), separate.pair.teacher(x_t, t, condition))
        assert torch.equal(module.pair.student(x_t, t, condition), own.pair.student(x_t, t, condition))
        assert not torch.equal(module.pair.teacher(x_t, t, condition), own.pair.teacher(x_t, t, condition))
    # The discriminator is the stage's: built from model.path, not from the skip-level teacher.
    for key, value in module.discriminator.backbone.state_dict().items():
        assert torch.equal(value, own.discriminator.backbone.state_dict()[key]), key


def test_discriminator_init_continues_an_earlier_phase(make_config, tiny_sdxl_path, tmp_path):
    phase_a, _ = build_module(make_config, tiny_sdxl_path, "loss=cond_adv")
    with torch.no_grad():
        for parameter in phase_a.discriminator.parameters():
            parameter.add_(0.01)
    export_student(phase_a, tmp_path / "export")
    saved = tmp_path / "export" / "discriminator.safetensors"
    phase_b, _ = build_module(make_config, tiny_sdxl_path, "loss=uncond_adv", f"discriminator.init={saved}")
    for key, value in phase_b.discriminator.backbone.state_dict().items():
        assert torch.equal(value, phase_a.discriminator.backbone.state_dict()[key]), key


SGD = ["optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas"]


@pytest.mark.parametrize("loss,student", [("cond_adv", "lora"), ("uncond_adv", "full"), ("mse_adv", "lora")])
def test_the_shared_judgement_trains_as_judging_in_each_phase(make_config, tiny_sdxl_path, loss, student, monkeypatch):
    """The lean step (one D forward shared by both phases, the generator's gradient through the
    detached fake) ends one batch with the same student and discriminator as the step that judges
    in each phase (FSDP2's path), to float rounding. SGD, so the comparison is not Adam's sign-like
    first step amplifying rounding (docs/MEASUREMENTS.md "Sharding")."""
    results, shared_calls = [], []
    for lean in (True, False):
        torch.manual_seed(0)
        module, cfg = build_module(make_config, tiny_sdxl_path, f"loss={loss}", f"student={student}",
                                   "student.lr=0.05", "discriminator.lr=0.05", f"discriminator.shared_forward={lean}", *SGD)
        before = snapshot(module)
        judge_once = module.judge_once
        module.judge_once = lambda *args, judge_once=judge_once: shared_calls.append(1) or judge_once(*args)
        torch.manual_seed(1)
        run_one_batch(module, cfg)
        results.append(snapshot(module))
    assert shared_calls == [1]
    lean, judged = results
    moved = {k for k in before if not torch.equal(before[k], lean[k])}
    assert any(k.startswith("discriminator.") for k in moved) and any(k.startswith("pair.") for k in moved)
    worst = max((lean[k] - judged[k]).abs().max().item() for k in lean)
    for part in ("pair.", "discriminator."):  # each optimizer moved its weights far beyond the difference
        update = max((lean[k] - before[k]).abs().max().item() for k in moved if k.startswith(part))
        assert update > 1e3 * max(worst, 1e-9), (part, update, worst)
    assert worst < 1e-6, worst


@pytest.mark.parametrize("loss,student", [("cond_adv", "lora"), ("uncond_adv", "full")])
def test_selective_checkpointing_trains_as_keeping_everything(make_config, tiny_sdxl_path, loss, student):
    """Selective activation checkpointing of the student and D's backbone (activation_checkpointing.py;
    D's fake rows are backpropagated twice by the lean step) ends a batch with the weights of the step
    that keeps every activation, to float rounding."""
    results = []
    for mode in ("selective", "none"):
        torch.manual_seed(0)
        module, cfg = build_module(make_config, tiny_sdxl_path, f"loss={loss}", f"student={student}",
                                   "student.lr=0.05", "discriminator.lr=0.05", f"student.gradient_checkpointing={mode}",
                                   f"discriminator.gradient_checkpointing={mode}", *SGD)
        blocks = [b for b in module.modules() if getattr(b, "gradient_checkpointing", False)]
        assert (len(blocks) > 0) == (mode == "selective")
        before = snapshot(module)
        torch.manual_seed(1)
        run_one_batch(module, cfg)
        results.append(snapshot(module))
    selective, kept = results
    worst = max((selective[k] - kept[k]).abs().max().item() for k in kept)
    update = max((kept[k] - before[k]).abs().max().item() for k in kept)
    assert update > 1e3 * max(worst, 1e-9) and worst < 1e-6, (update, worst)
