"""SIGTERM (a cluster's preemption) saves last.ckpt and the run does not look successful; the
checkpoint resumes (issue 15)."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SigtermAt(L.Callback):
    """Sends this process SIGTERM at the end of batch `at` (Lightning's handler stops after it)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.at:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_last_checkpoint_that_resumes(make_config):
    from lightning_sdxl.train import train

    overrides = ("loss=mse", "steps=6", "checkpoint.every_n_steps=100", "validation.every_n_steps=100", "logger=none")
    cfg = make_config(*overrides)
    with pytest.raises(SIGTERMException):  # a SystemExit that train.py turns into exit code 143
        train(cfg, [SigtermAt(at=1)])
    last = Path(cfg.output_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file(), "a preempted run must leave the checkpoint ckpt_path=last resumes"
    assert torch.load(last, weights_only=True, map_location="cpu")["global_step"] == 2  # batches 0 and 1
    assert not (Path(cfg.output_dir) / "export").exists()  # not finished, so not exported

    resumed = make_config(*overrides, f"ckpt_path={last}")
    trainer = train(resumed)
    assert trainer.global_step == 6 and (Path(cfg.output_dir) / "export" / "unet").is_dir()

    # Killed during the export (training finished, no export): resuming the finished run writes it.
    shutil.rmtree(Path(cfg.output_dir) / "export")
    finished = train(make_config(*overrides, f"ckpt_path={Path(cfg.output_dir) / 'checkpoints' / 'last.ckpt'}"))
    info = json.loads((Path(cfg.output_dir) / "export" / "export_info.json").read_text())
    assert finished.global_step == 6 and info["global_step"] == 6
