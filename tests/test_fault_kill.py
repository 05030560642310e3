"""The fault suite (slow): SIGKILL a training process at random moments (mid-batch, mid-checkpoint,
mid-export), resume with the README's command, and end bit-identical to the uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import CPU_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
RUN = ["loss=uncond_adv", "steps=8", "checkpoint.every_n_steps=2", "validation.every_n_steps=4", "logger=none"]
KILLS = 3


def command(run: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", *CPU_OVERRIDES, *RUN, f"hydra.run.dir={run}", *extra]


def environment() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def trained_state(run: Path) -> dict:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    optimizer = {f"{i}.{k}.{name}": v for i, o in enumerate(checkpoint["optimizer_states"])
                 for k, state in o["state"].items() for name, v in state.items()}
    return {**checkpoint["state_dict"], **optimizer, "global_step": torch.tensor(checkpoint["global_step"])}


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_ends_bit_identical(tmp_path):
    whole = tmp_path / "whole"
    done = subprocess.run(command(whole), cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    started = time.monotonic()
    subprocess.run(command(tmp_path / "timing"), cwd=REPO, env=environment(), capture_output=True, timeout=600, check=True)
    duration = time.monotonic() - started
    expected = trained_state(whole)

    chooser = random.Random(0)
    for kill in range(KILLS):
        run = tmp_path / f"killed{kill}"
        process = subprocess.Popen(command(run), cwd=REPO, env=environment(), stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(chooser.uniform(0.4, 1.0) * duration)  # anywhere from model loading to the export
        process.send_signal(signal.SIGKILL)
        process.wait()
        for _ in range(3):  # resume until finished (a kill before the first checkpoint: start afresh)
            extra = ["ckpt_path=last"] if (run / "checkpoints" / "last.ckpt").exists() else []
            resumed = subprocess.run(command(run, *extra), cwd=REPO, env=environment(), capture_output=True,
                                     text=True, timeout=600, check=False)
            assert resumed.returncode == 0, resumed.stderr[-3000:]
            if (run / "export" / "export_info.json").exists():
                break
        got = trained_state(run)
        different = [key for key in expected if not torch.equal(expected[key], got[key])]
        assert got.keys() == expected.keys() and not different, f"kill {kill}: {different[:3]}"
        assert (run / "export" / "unet" / "config.json").exists(), f"kill {kill}: no export"
