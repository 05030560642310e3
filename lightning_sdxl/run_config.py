"""A resumed run trains with its own settings: `python train.py ckpt_path=last hydra.run.dir=<run>`
composes the run's recorded overrides followed by this command's (the later win), instead of the
defaults (issue 15). Hydra rewrites `<run>/.hydra/overrides.yaml` at every start, so the first start
records its overrides in `<run>/run_overrides.yaml` and each resume appends its own to
`<run>/resumes.yaml`, beside, not over, the original."""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from lightning_sdxl import CONF_DIR
from lightning_sdxl.io import atomic_path

RUN_OVERRIDES, RESUMES = "run_overrides.yaml", "resumes.yaml"


def override_key(override: str) -> str:
    """The config key a command-line override sets (`+a.b=1`, `~a.b` -> `a.b`)."""
    return override.split("=", 1)[0].lstrip("+~")


def overrides_for(output_dir: str | Path, overrides: list[str]) -> list[str]:
    """The overrides to compose: a resume (`ckpt_path` given) of a run that recorded its own gets
    those first, then this command's; anything else is returned unchanged."""
    recorded = Path(output_dir) / RUN_OVERRIDES
    resuming = any(override_key(o) == "ckpt_path" for o in overrides)
    if not resuming or not recorded.is_file():
        return list(overrides)
    original = [o for o in yaml.safe_load(recorded.read_text()) or [] if override_key(o) != "ckpt_path"]
    return original + list(overrides)


def record(output_dir: str | Path, overrides: list[str]) -> None:
    """The first start writes run_overrides.yaml; a resume appends its overrides to resumes.yaml.
    Global rank 0 only (DDP's other processes rerun the command)."""
    if rank_zero_only.rank != 0:
        return
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    recorded = folder / RUN_OVERRIDES
    if not recorded.is_file():
        with atomic_path(recorded) as temporary:
            temporary.write_text(yaml.safe_dump(list(overrides)))
        return
    resumes = folder / RESUMES
    history = (yaml.safe_load(resumes.read_text()) or []) if resumes.is_file() else []
    with atomic_path(resumes) as temporary:
        temporary.write_text(yaml.safe_dump([*history, list(overrides)]))


def compose_train_config(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, inside or outside a running Hydra app."""
    if GlobalHydra.instance().is_initialized():  # inside python train.py (Hydra's app)
        return compose("train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)
