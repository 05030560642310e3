"""Shared fixtures: the real Hydra config, composed and shrunk for the CPU."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Offline and self-contained: no hub calls (each would retry for ~47 s), one tiny model per session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LIGHTNING_SDXL_HOME", tempfile.mkdtemp(prefix="lightning_sdxl_tests_"))
torch.set_num_threads(min(2, torch.get_num_threads()))

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")

# Small enough for seconds per run on 2 cores; the code path is unchanged.
CPU_OVERRIDES = [
    "model=tiny",  # the random tiny SDXL at 64 px: plumbing tests (test_toy_teacher.py runs the toy default)
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "data.resolution=64",
    "data.batch_size=2",
    "validation.num_prompts=2",
    "student.lora_rank=4",
    "logger=csv",
    "steps=2",
    "validation.every_n_steps=2",
    "checkpoint.every_n_steps=2",
    "trainer.log_every_n_steps=1",
]


def compose_config(overrides: list[str] = (), output_dir: Path | None = None, shrink: bool = True) -> DictConfig:
    """The training config as `python train.py <overrides>` would compose it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=(CPU_OVERRIDES if shrink else []) + list(overrides))
    with open_dict(cfg):
        cfg.output_dir = str(output_dir or tempfile.mkdtemp(prefix="lightning_sdxl_run_"))
    return cfg


@pytest.fixture
def make_config(tmp_path):
    def make(*overrides: str, shrink: bool = True) -> DictConfig:
        return compose_config(list(overrides), tmp_path / "run", shrink)

    return make


@pytest.fixture(scope="session")
def tiny_sdxl_path() -> str:
    from lightning_sdxl.models.tiny import ensure_tiny_sdxl

    return str(ensure_tiny_sdxl())
