"""Check `ckpt_path` before any model loads: it exists, and it was written by the same stage, loss
and student as the config that resumes it (issue 15: `loss=mse` on a cond_adv checkpoint trained
2 of 14 batches and labelled the export mse; `ckpt_path=last` without a checkpoint silently trained
from scratch)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightning_sdxl.checkpoint_hparams import read_hparams
from lightning_sdxl.errors import ConfigError, MissingPathError
from lightning_sdxl.sharding import SHARDED_METADATA, is_sharded_checkpoint

# DistillationModule's arguments that a resumed run must share; each is also the config key that sets
# it (the module records its component configs as given).
MUST_MATCH = ("loss.name", "stage.teacher_steps", "stage.student_steps", "student.type", "student.lora_rank")


def resume_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint `ckpt_path` names (None: a fresh run); `last` is the newest in the run's
    checkpoint folder, as Lightning resolves it."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None:
        return None
    if str(ckpt_path) == "last":
        folder = Path(OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath", default=None) or Path(cfg.output_dir) / "checkpoints")
        found = sorted(folder.glob("*.ckpt"), key=lambda path: path.stat().st_mtime) if folder.is_dir() else []
        if not found:
            raise MissingPathError(
                f"ckpt_path=last: {folder} holds no checkpoint; give this run's output folder "
                "(hydra.run.dir=<run>) or drop ckpt_path to start afresh."
            )
        return found[-1]
    if "://" in str(ckpt_path):  # Lightning loads remote checkpoints with weights_only=False (pickle)
        raise ConfigError(
            f"ckpt_path={ckpt_path} is remote: Lightning would load it with pickle; download it and give the local path."
        )
    path = Path(str(ckpt_path))
    if not (path.is_file() or is_sharded_checkpoint(path)):
        raise MissingPathError(f"ckpt_path={ckpt_path} does not exist: give a .ckpt of this run, or ckpt_path=last.")
    return path


def check_resume(cfg: DictConfig) -> None:
    """Raise ConfigError when the checkpoint was trained with another stage, loss or student."""
    path = resume_checkpoint(cfg)
    if path is None:
        return
    # trainer=fsdp writes a folder of shards with the hyperparameters in its metadata file.
    source = path / SHARDED_METADATA if is_sharded_checkpoint(path) else path
    try:  # mmap: only the small hyperparameter dict is read, not the weights
        saved = OmegaConf.create(read_hparams(source))  # older checkpoints' flat form upgraded
    except Exception as error:  # a truncated or foreign file
        raise ConfigError(f"ckpt_path={path} is not a readable Lightning checkpoint ({type(error).__name__}).") from error
    clashes = []
    for key in MUST_MATCH:
        recorded, value = OmegaConf.select(saved, key, default=None), OmegaConf.select(cfg, key, default=None)
        if recorded is not None and value is not None and recorded != value:
            clashes.append(f"{key}={recorded} (this config: {key}={value})")
    if clashes:
        raise ConfigError(
            f"ckpt_path={path} was trained with {', '.join(clashes)}: resume with the run's own stage, loss "
            "and student, or start a new run without ckpt_path."
        )
