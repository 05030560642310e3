"""trainer=fsdp (lightning_sdxl/sharding.py): FSDP2 over 2 CPU processes (gloo) trains what DDP trains,
checkpoints as a folder of shards, resumes with optimizer state exactly, and exports whole weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CPU_OVERRIDES
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# The command on the tiny model: the full-UNet phase of the last stage.
PHASE = ["stage=2to1", "loss=uncond_adv", "student=full", "trainer.devices=2", "trainer.accelerator=cpu"]
# Plain float32 and SGD, so two strategies can agree to float precision (Adam amplifies the order of
# float sums into weight differences of about its learning rate: docs/MEASUREMENTS.md "Sharding").
EXACT = [
    "trainer.precision=32-true", "optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas",
]
LR = ["student.lr=0.05", "discriminator.lr=0.05"]
FSDP = ["trainer=fsdp", "trainer.strategy.param_dtype=null"]


def run(run_dir: Path, *args: str) -> None:
    overrides = [o for o in CPU_OVERRIDES if not o.startswith("trainer=")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "train.py", *overrides, *PHASE, *args, "logger=none", f"hydra.run.dir={run_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def exported(run_dir: Path) -> dict[str, torch.Tensor]:
    unet = load_file(run_dir / "export" / "unet" / "diffusion_pytorch_model.safetensors")
    discriminator = load_file(run_dir / "export" / "discriminator.safetensors")
    return {**{f"unet.{k}": v for k, v in unet.items()}, **{f"discriminator.{k}": v for k, v in discriminator.items()}}


def initial(tiny_sdxl_path: str, keys) -> dict[str, torch.Tensor]:
    """The weights both runs start from where known: a full student starts as the teacher UNet, the
    discriminator's backbone as the teacher's encoder (its head is drawn at random)."""
    teacher = load_file(Path(tiny_sdxl_path) / "unet" / "diffusion_pytorch_model.safetensors")
    start = {}
    for key in keys:
        name = key.removeprefix("unet.").removeprefix("discriminator.backbone.")
        if not key.startswith("discriminator.head.") and name in teacher:
            start[key] = teacher[name].float()
    return start


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does_and_trains_every_weight(tmp_path, tiny_sdxl_path):
    run(tmp_path / "ddp", *EXACT, *LR, "trainer=cpu")
    run(tmp_path / "fsdp", *EXACT, *LR, *FSDP)
    ddp, fsdp = exported(tmp_path / "ddp"), exported(tmp_path / "fsdp")
    assert ddp.keys() == fsdp.keys()
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()  # a folder of shards
    before = initial(tiny_sdxl_path, ddp)
    assert len(before) > 0.9 * len(ddp)
    # Both end within float rounding of each other (DDP moved most weights by 1e-5 to 1e-3), and every weight SGD
    # clearly moved under DDP moved as far under FSDP (none silently left untrained).
    assert all(torch.allclose(fsdp[k], ddp[k], rtol=0, atol=1e-6) for k in ddp)
    update = {key: (ddp[key] - before[key]).abs().max().item() for key in before}
    moved = [key for key in before if update[key] > 1e-5]
    assert len(moved) > 0.5 * len(before)
    assert all((fsdp[k] - before[k]).abs().max().item() > 0.99 * update[k] for k in moved)


@pytest.mark.slow
def test_fsdp_resume_restores_weights_and_adam_state_exactly(tmp_path, tiny_sdxl_path):
    """Killed after its checkpoint at batch 2 and resumed to 4: the same weights as 4 in one go.
    Adam (the default optimizer) makes a resume without its moments visible at once."""
    plain = ["trainer.precision=32-true", "checkpoint.every_n_steps=2", "validation.every_n_steps=2"]
    run(tmp_path / "whole", *plain, *FSDP, "steps=4")
    run(tmp_path / "resumed", *plain, *FSDP, "steps=2")
    run(tmp_path / "resumed", *plain, *FSDP, "steps=4", "ckpt_path=last")
    whole, resumed = exported(tmp_path / "whole"), exported(tmp_path / "resumed")
    assert whole.keys() == resumed.keys()
    different = [key for key in whole if not torch.allclose(whole[key], resumed[key], rtol=0, atol=1e-6)]
    assert not different, f"{len(different)} of {len(whole)} tensors differ, e.g. {different[:3]}"
    info = (tmp_path / "resumed" / "export" / "export_info.json").read_text()
    assert '"global_step": 8' in info


@pytest.mark.slow
def test_two_processes_train_as_one_with_the_doubled_batch(tmp_path, tiny_sdxl_path):
    """DDP over 2 processes of batch 2 ends where 1 process of batch 4 does: each sample's draws come
    from its own generator, seeded by its row in the global batch (batch_randomness.py), and rank r
    holds rows r, r + 2, ... (data/resumable.py). Float32 SGD, so only the order of float sums differs."""
    run(tmp_path / "two", *EXACT, *LR, "trainer=cpu", "data.batch_size=2")
    run(tmp_path / "one", *EXACT, *LR, "trainer=cpu", "trainer.devices=1", "data.batch_size=4")
    two, one = exported(tmp_path / "two"), exported(tmp_path / "one")
    assert two.keys() == one.keys()
    before = initial(tiny_sdxl_path, one)
    moved = [key for key in before if (one[key] - before[key]).abs().max().item() > 1e-5]
    assert len(moved) > 0.5 * len(before)
    worst = max((two[key] - one[key]).abs().max().item() for key in one)
    assert worst < 1e-6, worst
