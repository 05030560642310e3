"""Config validation: a config that cannot work fails here, in one line, before any model loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from lightning_sdxl import ASSETS_DIR
from lightning_sdxl.data.latent_cache import check_cache_fits
from lightning_sdxl.diffusion.prediction import PREDICTIONS
from lightning_sdxl.errors import ConfigError, MissingPathError
from lightning_sdxl.io import check_replaceable
from lightning_sdxl.models.discriminator import DiscriminatorHead
from lightning_sdxl.models.loading import check_pipeline_folder
from lightning_sdxl.models.vae import vae_scale_factor
from lightning_sdxl.resume_checks import check_resume

VALID_DTYPES = ("float32", "bfloat16", "float16")
# The groups whose files are components (their _target_); the teacher's stage is a workflow's settings.
COMPONENT_GROUPS = ("stage", "loss", "student", "discriminator")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# Keys that must hold numbers (a typo such as student.lr=abc fails here, not in a comparison).
NUMBER_KEYS = ("steps", "student.lr", "discriminator.lr", "data.batch_size", "stage.teacher_steps",
               "stage.student_steps", "validation.every_n_steps", "checkpoint.every_n_steps",
               "optim.accumulate_grad_batches", "optim.gradient_clip_val", "optim.max_nonfinite_steps")


def _check_numbers(cfg: DictConfig) -> None:
    for key in NUMBER_KEYS:
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        _require(
            value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)),
            f"{key}={value!r} is not a number; give e.g. {key}=1e-4." if key.endswith("lr") else f"{key}={value!r} is not a number.",
        )


def components(cfg: DictConfig) -> dict[str, object]:
    """The config's component groups instantiated (cheap objects, no weights): each checks its own
    settings, and a bad one fails here as a ConfigError naming the group."""
    import hydra
    from hydra.errors import InstantiationException

    built = {}
    for group in COMPONENT_GROUPS:
        if "_target_" not in cfg[group]:
            continue
        try:
            built[group] = hydra.utils.instantiate(cfg[group])
        except InstantiationException as error:
            cause = error.__cause__ or error
            if isinstance(cause, TypeError):  # a key the group's class does not take (a typo)
                raise ConfigError(f"{group}: {cause}; check the key's spelling against conf/{group}/.") from None
            raise ConfigError(str(cause)) from None
    return built


def validate_config(cfg: DictConfig) -> None:
    """Check the composed training config; raise ConfigError naming the key and the fix."""
    _check_numbers(cfg)
    stage, loss = cfg.stage, cfg.loss
    if "student_steps" in stage:  # a distillation stage (stage=teacher has no student)
        _require(
            stage.student_steps >= 1 and stage.teacher_steps >= stage.student_steps
            and stage.teacher_steps % stage.student_steps == 0,
            f"stage.teacher_steps={stage.teacher_steps} is not a positive multiple of stage.student_steps="
            f"{stage.student_steps}; pick steps whose ratio is a whole number (e.g. stage=8to4).",
        )
    teacher_parts = (stage.name == "teacher", loss.name == "denoising", cfg.module._target_.endswith("TeacherModule"))
    _require(
        all(teacher_parts) or not any(teacher_parts),
        f"stage={stage.name}, loss={loss.name}, module={cfg.module._target_.rsplit('.', 1)[-1]}: a teacher trains "
        "with stage=teacher, loss=denoising and module=teacher together; experiment=toy_teacher selects them.",
    )
    built = components(cfg)
    adversarial = built["loss"].adversarial
    _require(
        cfg.prediction.type is None or cfg.prediction.type in PREDICTIONS,
        f"prediction.type={cfg.prediction.type}: choose one of {sorted(PREDICTIONS)} or prediction=teacher.",
    )
    _check_accelerator(cfg.trainer)
    if stage.get("segments"):
        _check_trajectory_segments(cfg, built["loss"])
    _require(cfg.steps >= 1, f"steps={cfg.steps}: train for at least 1 batch.")
    _require(cfg.data.batch_size >= 1, f"data.batch_size={cfg.data.batch_size}: give at least 1 image per batch.")
    _require(cfg.student.lr > 0, f"student.lr={cfg.student.lr} must be > 0.")
    _require(
        cfg.trainer.get("max_steps", -1) in (-1, None),
        f"trainer.max_steps={cfg.trainer.max_steps}: set steps=N (batches) instead; max_steps is derived.",
    )
    _require(
        cfg.validation.every_n_steps >= 1 and cfg.checkpoint.every_n_steps >= 1,
        "validation.every_n_steps and checkpoint.every_n_steps must be >= 1 (batches).",
    )
    accumulate = cfg.optim.accumulate_grad_batches
    _require(
        accumulate >= 1 and cfg.steps % accumulate == 0 and cfg.checkpoint.every_n_steps % accumulate == 0,
        f"optim.accumulate_grad_batches={accumulate}: must be >= 1 and divide steps={cfg.steps} and "
        f"checkpoint.every_n_steps={cfg.checkpoint.every_n_steps} (all count batches).",
    )
    factor = _vae_factor(cfg)
    _require(
        cfg.data.resolution % factor == 0,
        f"data.resolution={cfg.data.resolution} must be a multiple of {factor} (the VAE downsamples by {factor}).",
    )
    _require(
        cfg.model.frozen_dtype in VALID_DTYPES,
        f"model.frozen_dtype={cfg.model.frozen_dtype}: choose one of {VALID_DTYPES}.",
    )
    _require(
        cfg.model.frozen_dtype == "float32" or "mixed" in str(cfg.trainer.precision),
        f"model.frozen_dtype={cfg.model.frozen_dtype} needs mixed precision: add "
        "trainer.precision=bf16-mixed (trainer=gpu) or set model.frozen_dtype=float32.",
    )
    if adversarial:
        blocks = cfg.discriminator.head_blocks
        _require(blocks is None or blocks >= 0, "discriminator.head_blocks must be >= 0 or null (automatic).")
        warmup = cfg.discriminator.warmup
        _require(
            0 <= warmup < cfg.steps,
            f"discriminator.warmup={warmup} must be >= 0 and below steps={cfg.steps} (the generator must train).",
        )
        _require(cfg.discriminator.lr > 0, f"discriminator.lr={cfg.discriminator.lr} must be > 0.")
        weight = built["loss"].adversarial_weight
        _require(weight > 0, f"loss.adversarial_weight={weight} must be > 0 (loss=mse is the MSE-only arm).")
    _check_checkpointing(cfg)
    experiment = cfg.get("experiment_name")
    _require(
        not (experiment == "toy" and cfg.model.name not in ("toy", "tiny")),
        f"experiment=toy is scaled for the toy and tiny models, not model={cfg.model.name}: "
        "add experiment=sdxl (the paper's settings) or ~experiment (no preset).",
    )
    start = stage.get("start_timesteps")
    _require(
        start is None or start == "all" or (OmegaConf.is_list(start) and len(start) > 0),
        f"stage.start_timesteps={start}: a list of timesteps, 'all', or null (the student's grid).",
    )
    init = cfg.get("student_init")
    if init is not None and not Path(str(init)).exists():
        raise MissingPathError(
            f"student_init={init} does not exist: give a LoRA file (student=lora) or a UNet folder (student=full)."
        )
    teacher_path = cfg.get("teacher_path")
    if teacher_path is not None:
        try:
            check_pipeline_folder(str(teacher_path))
        except FileNotFoundError as error:
            raise MissingPathError(f"teacher_path: {error}") from error
    discriminator_init = cfg.discriminator.get("init")
    if discriminator_init is not None:
        _require(
            adversarial,
            f"discriminator.init={discriminator_init} with loss={loss.name}: only the adversarial losses "
            "have a discriminator; drop discriminator.init.",
        )
        if not Path(str(discriminator_init)).is_file():
            raise MissingPathError(
                f"discriminator.init={discriminator_init} does not exist: give the discriminator.safetensors "
                "of an earlier phase's export/ (same stage), or discriminator.init=null."
            )
    _check_data_root(cfg.data)
    _check_cache(cfg)
    export_dir = OmegaConf.select(cfg, "callbacks.export.dirpath", throw_on_resolution_failure=False)
    if export_dir is not None:
        check_replaceable(export_dir)  # refused now, not after training (io.py: never deletes user files)
    if cfg.model.path is not None:
        try:
            check_pipeline_folder(str(cfg.model.path))
        except FileNotFoundError as error:
            hint = " (a packaged toy teacher: regenerate it with python -m lightning_sdxl.toy.build_teacher)"
            packaged = Path(str(cfg.model.path)).resolve().is_relative_to(ASSETS_DIR)
            raise MissingPathError(str(error) + (hint if packaged else "")) from error
    if adversarial:
        _check_discriminator_fits(cfg)
    check_resume(cfg)
    _check_loggers(cfg)


def _check_checkpointing(cfg: DictConfig) -> None:
    """Activation checkpointing modes (activation_checkpointing.py) of the student, D and the FSDP strategy."""
    from lightning_sdxl.activation_checkpointing import MODES, checkpointing_mode

    for key in ("student.gradient_checkpointing", "discriminator.gradient_checkpointing", "trainer.strategy.activation_checkpointing"):
        value = OmegaConf.select(cfg, key, default=None)
        try:
            checkpointing_mode(value)  # the one rule of what a mode may be
        except ValueError:
            _require(False, f"{key}={value}: choose one of {', '.join(MODES)} (activation checkpointing; true / false mean full / none).")


def _check_accelerator(trainer: DictConfig) -> None:
    """trainer=gpu / ddp / fsdp on a machine without a GPU: say so before the models load (Lightning
    would stop after loading them with "No supported gpu backend found")."""
    import torch

    if str(trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"trainer.accelerator={trainer.accelerator} but no GPU is visible on this machine; add "
            "trainer.accelerator=cpu (with trainer.devices=N for N processes), or run on a GPU node."
        )


def _check_loggers(cfg: DictConfig) -> None:
    """An optional logger package that is not installed (wandb) fails here, not after the model loads."""
    for key, logger in (cfg.get("logger") or {}).items():
        target = str((logger or {}).get("_target_", ""))
        if target.rsplit(".", 1)[-1] == "WandbLogger" and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                f"logger.{key} needs the wandb package, which is not installed: pip install wandb "
                "(or choose logger=tensorboard or logger=csv)."
            )


# Data paths a data module needs: key -> (must be a folder, what it is).
_DATA_PATHS = {
    "root": (True, "a folder of images with sidecar .txt captions"),
    "captions_file": (False, "a COCO captions JSON"),
    "image_root": (True, "the folder of the images the captions file names"),
    "manifest": (False, "a CSV or parquet manifest of image paths and captions"),
}


def _check_trajectory_segments(cfg: DictConfig, loss) -> None:
    """stage=tscd (Hyper-SD's TSCD, METHOD.md 7) with its loss and strategy (the stage's own grid and
    target network: `SegmentedStage`, built by `components`)."""
    stage = cfg.stage
    _require(
        loss.regression,
        f"stage={stage.name} trains with loss=mse or loss=mse_adv (Hyper-SD's MSE + adversarial mix), not loss={cfg.loss.name}.",
    )
    strategy = str(cfg.trainer.get("strategy", {}).get("_target_", "")) if OmegaConf.is_dict(cfg.trainer.get("strategy")) else ""
    _require(
        not (strategy.endswith("FullyShardedStrategy") and stage.consistency_target == "ema"),
        f"stage={stage.name} with trainer=fsdp: the EMA target is not sharded; use stage.consistency_target=online or trainer=ddp.",
    )


def _check_cache(cfg: DictConfig) -> None:
    """data=cached: the cache exists and was written by this model at this resolution."""
    if str(cfg.data.get("_target_", "")).endswith("CachedDataModule"):
        check_cache_fits(cfg.data.cache_dir, str(cfg.model.path), cfg.data.resolution)


def _check_data_root(data: DictConfig) -> None:
    """Data paths must be set and exist (data modules index them after the model builds)."""
    for key, (is_folder, what) in _DATA_PATHS.items():
        if key not in data.keys():  # noqa: SIM118 (`in` alone is False for a ??? value)
            continue
        if OmegaConf.is_missing(data, key):
            raise ConfigError(f"data.{key} is not set: add data.{key}=/path ({what}).")
        path = Path(str(data[key]))
        if data[key] is not None and not (path.is_dir() if is_folder else path.is_file()):
            raise MissingPathError(f"data.{key}={data[key]} does not exist: point data.{key} at {what}.")


def _component_config(cfg: DictConfig, component: str) -> dict | None:
    """A local model folder's `<component>/config.json`, else None (hub ids, tiny not yet built)."""
    path = cfg.model.path
    config = Path(str(path)) / component / "config.json" if path is not None else None
    return json.loads(config.read_text()) if config is not None and config.exists() else None


def _vae_factor(cfg: DictConfig) -> int:
    """The VAE's downsampling factor (8 unless a local folder says otherwise)."""
    vae = _component_config(cfg, "vae")
    return vae_scale_factor(vae) if vae else 8


def _unet_levels(cfg: DictConfig) -> int | None:
    """The UNet's stride-2 levels from a local folder's unet config (the tiny model's folder is
    written when its path resolves); None for a hub id."""
    unet = _component_config(cfg, "unet")
    return len(unet["block_out_channels"]) - 1 if unet else None


def _check_discriminator_fits(cfg: DictConfig) -> None:
    """The head's stride-2 blocks need features of at least 2^blocks pixels (local or tiny UNets)."""
    levels = _unet_levels(cfg)
    if levels is None or cfg.discriminator.head_blocks is None:  # null: the depth follows the features
        return
    feature_size = cfg.data.resolution // _vae_factor(cfg) // 2**levels
    needed = DiscriminatorHead.min_input_size(cfg.discriminator.head_blocks)
    _require(
        feature_size >= needed,
        f"discriminator.head_blocks={cfg.discriminator.head_blocks} needs {needed} x {needed} features, but "
        f"data.resolution={cfg.data.resolution} gives {feature_size} x {feature_size}: lower head_blocks "
        "(or null: automatic) or raise the resolution.",
    )
