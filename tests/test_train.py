"""End-to-end runs through train(cfg): each loss, resume, and the CLI under DDP and multirun."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import CPU_OVERRIDES

from lightning_sdxl.train import train

REPO = Path(__file__).resolve().parents[1]


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("loss", ["mse", "cond_adv", "uncond_adv"])
def test_short_run_of_each_loss(make_config, loss):
    cfg = make_config(f"loss={loss}")
    trainer = train(cfg)
    run_dir = Path(cfg.output_dir)
    assert trainer.global_step == cfg.steps * (1 if loss == "mse" else 2)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == trainer.global_step
    assert (run_dir / "samples" / f"step_{cfg.steps:06d}.png").exists()
    columns = set().union(*(row.keys() for row in read_metrics(run_dir)))
    assert {"loss/generator", "lr/generator", "val/latent_mse_to_teacher"} <= columns
    if loss != "mse":
        assert {"loss/discriminator", "discriminator/accuracy_real", "discriminator/logits_fake"} <= columns


def test_resume_from_last_checkpoint_continues_the_run(make_config):
    cfg = make_config("steps=2")
    first = train(cfg)
    saved = torch.load(Path(cfg.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)

    restored = {}

    class AtStart(L.Callback):
        def on_train_start(self, trainer, pl_module):
            restored["global_step"] = trainer.global_step
            restored["state"] = {k: v.clone() for k, v in pl_module.state_dict().items() if k in saved["state_dict"]}

    second = train(make_config("steps=4", "ckpt_path=last"), extra_callbacks=[AtStart()])
    assert restored["global_step"] == first.global_step == 4
    assert all(torch.equal(restored["state"][k], saved["state_dict"][k]) for k in saved["state_dict"])
    assert second.global_step == 8


def run_cli(args: list[str], flags: list[str] = (), timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "train.py", *flags, *CPU_OVERRIDES, *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False,
    )


@pytest.mark.slow  # 45 s: two processes (pytest -m slow, which CI runs)
def test_cli_ddp_two_cpu_processes(tmp_path):
    """python train.py stage=2to1 loss=uncond_adv trainer.devices=2 trainer.accelerator=cpu"""
    result = run_cli(
        ["stage=2to1", "loss=uncond_adv", "trainer.devices=2", "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path}"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert "All distributed processes registered" in result.stderr + result.stdout
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4


@pytest.mark.slow  # ~20-50 s on 2 cores: the default suite stays under 10 minutes
def test_cli_multirun_over_losses(tmp_path):
    result = run_cli(["loss=mse,cond_adv,uncond_adv", f"hydra.sweep.dir={tmp_path}"], flags=["-m"])
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(path.parent.parent.name for path in tmp_path.glob("*/checkpoints/last.ckpt"))
    assert len(runs) == 3, runs
    assert {run.split("_", 2)[2].rsplit("_", 1)[0] for run in runs} == {"mse", "cond_adv", "uncond_adv"}


def test_gradient_accumulation_steps_once_per_accumulated_batches(make_config):
    steps_at = []

    class Spy(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            steps_at.append(trainer.fit_loop.epoch_loop.batch_idx)

    cfg = make_config("optim.accumulate_grad_batches=2", "steps=4", "validation.every_n_steps=4")
    trainer = train(cfg, extra_callbacks=[Spy()])
    assert trainer.global_step == 4  # 2 updates x (generator + discriminator)
    assert steps_at == [1, 1, 3, 3]  # batches 0 and 2 only accumulate


def test_accumulation_must_divide_the_batch_counts(make_config):
    from lightning_sdxl.config_checks import ConfigError

    with pytest.raises(ConfigError, match="optim.accumulate_grad_batches=3"):
        train(make_config("optim.accumulate_grad_batches=3", "steps=4"))


@pytest.mark.slow  # ~20-50 s on 2 cores: the default suite stays under 10 minutes
def test_cli_log_file_gets_progress_lines_and_checkpoint_names_paste_as_overrides(tmp_path):
    """Off a terminal (here: captured output, as in a SLURM log) progress is plain lines in batches;
    a periodic checkpoint's name pastes into ckpt_path= as is, and every periodic one is kept."""
    run = tmp_path / "run"
    common = ["loss=uncond_adv", "checkpoint.every_n_steps=2", "progress_log_seconds=0", f"hydra.run.dir={run}"]
    first = run_cli(["steps=4", *common])
    assert first.returncode == 0, first.stderr[-3000:]
    output = first.stdout + first.stderr
    assert "batch 2/4 (50%)" in output and "batch 4/4 (100%)" in output and "ETA" in output
    assert "Finished: 4 batches trained" in output
    assert "max_steps=" not in output and "Epoch 0/-2" not in output
    periodic = sorted(path.name for path in (run / "checkpoints").glob("global-step-*.ckpt"))
    assert periodic == ["global-step-0000004.ckpt", "global-step-0000008.ckpt"]  # 2 optimizer steps per batch
    branch = tmp_path / "branch"  # continue from the earlier checkpoint in a run of its own
    resumed = run_cli(["steps=6", *common[:-1], f"hydra.run.dir={branch}", f"ckpt_path={run / 'checkpoints' / periodic[0]}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "batch 6/6 (100%)" in resumed.stdout + resumed.stderr
    assert torch.load(branch / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    # The README's resume names only the folder: the run's own settings (loss=uncond_adv, not the
    # default cond_adv, which the checkpoint check would refuse) come from its run_overrides.yaml.
    again = run_cli(["ckpt_path=last", "steps=6", "progress_log_seconds=0", f"hydra.run.dir={run}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    assert "steps=4" in (run / "run_overrides.yaml").read_text()  # the original, kept
    assert "ckpt_path=last" in (run / "resumes.yaml").read_text()  # the resume, recorded beside it


def test_step_convention_in_one_place(make_config):
    """steps counts batches; Lightning's max_steps counts optimizer steps. A teacher run ignores the
    optim group's accumulation (it trained half the batches asked for when max_steps divided by it)."""
    from lightning_sdxl.steps import to_batches
    from lightning_sdxl.train import optimizer_steps

    assert optimizer_steps(make_config("loss=cond_adv", "optim.accumulate_grad_batches=2"), 8) == 8
    assert optimizer_steps(make_config("loss=mse", "optim.accumulate_grad_batches=2"), 8) == 4
    assert optimizer_steps(make_config("experiment=toy_teacher", "optim.accumulate_grad_batches=2"), 8) == 8
    assert to_batches(8, optimizers_per_batch=2, accumulate=2) == 8 and to_batches(8, 1) == 8
