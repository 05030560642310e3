"""The progressive recipe in one command (METHOD.md 2-4).

    128 to 32 (MSE, teacher CFG)  ->  for each adversarial stage:  (a) LoRA + cond_adv
                                                                    (b) the same LoRA + uncond_adv
                                                                    (c) merged, full UNet + uncond_adv
    and before 2 to 1 the x0 conversion (a frozen copy's x0 as the target, prediction=sample).

Each stage's result is the next stage's teacher and initial student; the discriminator is rebuilt
from the teacher at every phase. Every phase is an ordinary `train(cfg)` run in its own folder
`<output_dir>/<NN>_<stage>_<phase>/`; a finished phase leaves `DONE`, so re-running the command
after an interruption skips finished phases and resumes the unfinished one from its last.ckpt.
A stage's result becomes a teacher as a diffusers SDXL folder, `teacher/`, beside the phase: the
base model's VAE, text encoders and tokenizers (linked) with the phase's exported UNet and scheduler.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

from lightning_sdxl.config_checks import validate_config
from lightning_sdxl.export import atomic_dir
from lightning_sdxl.models.tiny import ensure_tiny_sdxl
from lightning_sdxl.train import train

log = logging.getLogger(__name__)
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
DONE = "DONE"
# Keys each phase sets itself; the user's own values for them are dropped from the phase overrides
# (group choices and paths only: `student.lr=...` or `loss.renoise_weights=...` pass through).
PHASE_KEYS = {"stage", "loss", "student", "prediction", "student_init", "model.path", "ckpt_path", "output_dir", "experiment"}
RECIPE_PREFIXES = ("recipe", "hydra")


@dataclass
class Phase:
    """One training run of the recipe."""

    name: str
    overrides: list[str]
    init_from: str | None = None  # "lora" or "unet" of the previous phase
    ends_stage: bool = False  # its result is the next teacher
    extra: list[str] = field(default_factory=list)


def recipe_phases(recipe: DictConfig) -> list[Phase]:
    """The phase list of `recipe` (conf/experiment/*recipe*.yaml)."""
    phases = []
    if recipe.first_stage:
        phases.append(Phase(
            f"{recipe.first_stage}_mse", [f"stage={recipe.first_stage}", "loss=mse", "student=full"],
            ends_stage=True, extra=list(recipe.mse_overrides),
        ))
    for stage in recipe.stages:
        prediction = []
        if stage == recipe.x0_before:
            phases.append(Phase(
                "x0_conversion", ["stage=x0", "loss=mse", "student=full", "prediction=sample"],
                ends_stage=True, extra=list(recipe.mse_overrides),
            ))
            prediction = ["prediction=sample"]
        # recipe.adversarial=false: the same phases with loss=mse (the toy Table 2's baseline).
        a, b = ("cond_adv", "uncond_adv") if recipe.get("adversarial", True) else ("mse", "mse")
        name = {"cond_adv": "cond", "uncond_adv": "uncond", "mse": "mse"}
        phases += [
            Phase(f"{stage}_a_lora_{name[a]}", [f"stage={stage}", f"loss={a}", "student=lora", *prediction]),
            Phase(f"{stage}_b_lora_{name[b]}", [f"stage={stage}", f"loss={b}", "student=lora", *prediction], "lora"),
            Phase(f"{stage}_c_full_{name[b]}", [f"stage={stage}", f"loss={b}", "student=full", *prediction], "unet", ends_stage=True),
        ]
    return phases


def assemble_teacher(base: Path, export: Path, out: Path) -> Path:
    """A diffusers SDXL folder: the base's components (symlinked) with the export's UNet and scheduler."""
    if (out / "model_index.json").exists():
        return out
    with atomic_dir(out) as staging:
        for entry in base.iterdir():
            if entry.name not in ("unet", "scheduler"):
                os.symlink(entry.resolve(), staging / entry.name)
        shutil.copytree(export / "unet", staging / "unet")
        shutil.copytree(export / "scheduler", staging / "scheduler")
    return out


def compose_train_config(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, inside or outside a running Hydra app."""
    if GlobalHydra.instance().is_initialized():  # inside python train.py (Hydra's app)
        return compose("train", overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def _user_overrides(overrides: list[str]) -> list[str]:
    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    return [o for o in overrides if key(o) not in PHASE_KEYS and not key(o).startswith(RECIPE_PREFIXES)]


def run_recipe(cfg: DictConfig, overrides: list[str], extra_callbacks: list[L.Callback] = ()) -> Path:
    """Run (or finish) every phase of `cfg.recipe`; returns the final teacher folder.

    Args:
        cfg: the composed config of the recipe command (its `recipe` block and `output_dir`).
        overrides: the command line's overrides, applied to every phase (model, data, trainer...).
        extra_callbacks: added to every phase (tests).
    """
    root = Path(cfg.output_dir)
    base = Path(ensure_tiny_sdxl(cfg.model.path, cfg.model.seed) if cfg.model.name == "tiny" else cfg.model.path)
    common = _user_overrides(overrides) + list(cfg.recipe.phase_overrides)
    if cfg.recipe.phase_experiment:
        common.append(f"experiment={cfg.recipe.phase_experiment}")
    phases = recipe_phases(cfg.recipe)
    # Every phase's config is checked before the first one trains (teachers do not exist yet).
    for phase in phases:
        validate_config(compose_train_config(common + phase.overrides + phase.extra + [f"model.path={base}"]))
    teacher, previous = base, None
    for index, phase in enumerate(phases):
        phase_dir = root / f"{index:02d}_{phase.name}"
        init = None
        if phase.init_from == "lora":
            init = previous / "export" / "lora.safetensors"
        elif phase.init_from == "unet":
            init = previous / "export" / "unet"
        if (phase_dir / DONE).exists():
            log.info("Recipe: %s is done, skipped", phase.name)
        else:
            resume = (phase_dir / "checkpoints" / "last.ckpt").exists()
            log.info("Recipe: %s (%s)", phase.name, "resuming" if resume else "starting")
            phase_cfg = compose_train_config(
                common + phase.overrides + phase.extra
                + [f"model.path={teacher}", f"student_init={init}" if init else "student_init=null"]
                + (["ckpt_path=last"] if resume else [])
            )
            with open_dict(phase_cfg):
                phase_cfg.output_dir = str(phase_dir)
            train(phase_cfg, extra_callbacks=list(extra_callbacks))
            (phase_dir / DONE).write_text(json.dumps({"phase": phase.name, "teacher": str(teacher)}))
        previous = phase_dir
        if phase.ends_stage:
            teacher = assemble_teacher(base, phase_dir / "export", phase_dir / "teacher")
    return teacher
