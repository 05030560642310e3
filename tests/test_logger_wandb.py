"""logger=wandb: Lightning's own WandbLogger, offline into the run directory; wandb is optional, and
without it the config fails in one line naming `pip install wandb`, before any model loads."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_sdxl.errors import ConfigError
from lightning_sdxl.train import train

REPO = Path(__file__).resolve().parents[1]
WANDB_INSTALLED = importlib.util.find_spec("wandb") is not None


def test_wandb_config_is_lightnings_logger_offline_in_the_run_directory(make_config):
    cfg = make_config("logger=wandb")
    entry = cfg.logger.wandb
    assert list(cfg.logger) == ["wandb"]
    assert entry._target_ == "lightning.pytorch.loggers.WandbLogger"
    assert entry.offline is True and entry.log_model is False
    assert Path(entry.save_dir) == Path(cfg.output_dir)
    assert (entry.project, entry.name) == ("lightning_sdxl", "8to4_cond_adv")
    both = make_config("logger=[tensorboard,wandb]")
    assert list(both.logger) == ["tensorboard", "wandb"]


def _model_loaded(*args, **kwargs):
    raise AssertionError("model loaded")


@pytest.mark.skipif(WANDB_INSTALLED, reason="wandb is installed: the logger builds")
def test_without_wandb_training_stops_in_one_line_before_any_model_loads(make_config, monkeypatch):
    monkeypatch.setattr("lightning_sdxl.module.load_sdxl", _model_loaded)
    monkeypatch.setattr("lightning_sdxl.models.tiny.ensure_tiny_sdxl", _model_loaded)
    with pytest.raises(ConfigError) as raised:
        train(make_config("logger=wandb"))
    message = str(raised.value)
    assert "pip install wandb" in message and "logger.wandb" in message
    assert "\n" not in message.strip(), message


@pytest.mark.skipif(WANDB_INSTALLED, reason="wandb is installed: the logger builds")
def test_without_wandb_the_command_prints_one_config_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "LIGHTNING_SDXL_HOME": str(tmp_path / "home")},
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Config error:")]
    assert len(errors) == 1 and "pip install wandb" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr + result.stdout
