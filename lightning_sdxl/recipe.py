"""The progressive recipe in one command (METHOD.md 2-4).

    128 to 32 (MSE, teacher CFG)  ->  for each adversarial stage:  (a) LoRA + cond_adv
                                                                    (b) the same LoRA + uncond_adv
                                                                    (c) merged, full UNet + uncond_adv
    and before 2 to 1 the x0 conversion (a frozen copy's x0 as the target, prediction=sample).

Each stage's result is the next stage's teacher and initial student; the discriminator is built
from the teacher at every stage's phase (a) and continued through (b) and (c) (its head restarts at
(b), where it loses the x_t input); `recipe.discriminator_per_stage=false` rebuilds it every phase.
`recipe.skip_level_stages=[4to2,2to1]` gives those stages' unconditional phases the teacher one
level up (the 8- and 4-step models: the paper's unnamed "skip-level" teacher, METHOD.md 4).

Every phase is an ordinary `train(cfg)` run in its own folder `<output_dir>/<NN>_<stage>_<phase>/`;
a finished phase leaves `DONE`, so re-running the command after an interruption skips finished
phases and resumes the unfinished one from its last.ckpt.
A stage's result becomes a teacher as a diffusers SDXL folder, `teacher/`, beside the phase: the
base model's VAE, text encoders and tokenizers (linked) with the phase's exported UNet and scheduler.
Its LoRA for the base model (`base_lora/`, extracted from the full UNet: the phases' own LoRAs sit on
the stage's teacher) and `<output_dir>/releases.json` (per step count: pipeline, UNet, scheduler,
single file, LoRA) are what users ship.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
from huggingface_hub import snapshot_download
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_sdxl import CONF_DIR as PACKAGE_CONF_DIR
from lightning_sdxl.config_checks import validate_config
from lightning_sdxl.errors import ConfigError
from lightning_sdxl.export import (
    DISCRIMINATOR_FILE,
    INFO_FILE,
    KOHYA_FILE,
    LORA_FILE,
    SCHEDULER_DIR,
    SINGLE_FILE,
    UNET_DIR,
)
from lightning_sdxl.io import atomic_dir, atomic_path
from lightning_sdxl.lora_extract import extract_to_folder
from lightning_sdxl.run_config import override_key
from lightning_sdxl.train import train

log = logging.getLogger(__name__)
CONF_DIR = str(PACKAGE_CONF_DIR)
DONE = "DONE"
BASE_LORA_DIR, RELEASES_FILE = "base_lora", "releases.json"
# Keys each phase sets itself; the user's own values for them are dropped from the phase overrides
# (group choices and paths only: `student.lr=...` or `loss.renoise_weights=...` pass through).
PHASE_KEYS = {
    "stage", "loss", "student", "prediction", "student_init", "teacher_path", "discriminator.init", "model.path",
    "ckpt_path", "output_dir", "experiment",
}
RECIPE_PREFIXES = ("recipe", "hydra")


@dataclass
class Phase:
    """One training run of the recipe."""

    name: str
    overrides: list[str]
    init_from: str | None = None  # "lora" or "unet" of the previous phase
    ends_stage: bool = False  # its result is the next teacher
    extra: list[str] = field(default_factory=list)
    result_steps: int | None = None  # the steps its result samples with (None: its teacher's)
    continues_discriminator: bool = False  # starts from the previous phase's discriminator
    skip_level: bool = False  # its teacher is the model one level up (recipe.skip_level_stages)


def stage_config(name: str) -> DictConfig:
    return OmegaConf.load(Path(CONF_DIR) / "stage" / f"{name}.yaml")


def recipe_phases(recipe: DictConfig) -> list[Phase]:
    """The phase list of `recipe` (conf/experiment/*recipe*.yaml)."""
    phases = []
    if recipe.first_stage:
        phases.append(Phase(
            f"{recipe.first_stage}_mse", [f"stage={recipe.first_stage}", "loss=mse", "student=full"],
            ends_stage=True, extra=list(recipe.mse_overrides),
            result_steps=stage_config(recipe.first_stage).student_steps,
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
        adversarial = recipe.get("adversarial", True)
        a, b = ("cond_adv", "uncond_adv") if adversarial else ("mse", "mse")
        name = {"cond_adv": "cond", "uncond_adv": "uncond", "mse": "mse"}
        carry = adversarial and recipe.get("discriminator_per_stage", True)
        steps = stage_config(stage).student_steps
        skip = stage in (recipe.get("skip_level_stages") or [])
        phases += [
            Phase(f"{stage}_a_lora_{name[a]}", [f"stage={stage}", f"loss={a}", "student=lora", *prediction]),
            Phase(
                f"{stage}_b_lora_{name[b]}", [f"stage={stage}", f"loss={b}", "student=lora", *prediction], "lora",
                continues_discriminator=carry, skip_level=skip,
            ),
            Phase(
                f"{stage}_c_full_{name[b]}", [f"stage={stage}", f"loss={b}", "student=full", *prediction], "unet",
                ends_stage=True, result_steps=steps, continues_discriminator=carry, skip_level=skip,
            ),
        ]
    return phases


def skip_level_teachers(recipe: DictConfig, phases: list[Phase]) -> dict[int, int]:
    """Phase index -> the steps of its skip-level teacher: the model one level above its teacher
    (METHOD.md 4: the 2 to 1 stage's unconditional phases learn from the 4-step model, 4 to 2's from
    the 8-step one). Raises ConfigError when the recipe never had that model."""
    first = recipe.first_stage or (recipe.stages[0] if recipe.stages else None)
    steps = stage_config(first).teacher_steps if first else None
    levels, plan = {steps}, {}
    for index, phase in enumerate(phases):
        if phase.skip_level:
            above = [level for level in levels if level > steps]
            if not above:
                raise ConfigError(
                    f"recipe.skip_level_stages: phase {phase.name} needs the model one level above its "
                    f"{steps}-step teacher, which this recipe does not produce (it starts at {first}); start "
                    "the recipe earlier (recipe.first_stage / recipe.stages) or drop the stage from "
                    "recipe.skip_level_stages."
                )
            plan[index] = min(above)
        if phase.ends_stage:
            steps = phase.result_steps or steps
            levels.add(steps)
    return plan


def local_model_folder(path: Path) -> Path:
    """A local folder, or a hub id's cached snapshot (the first phase's loading has fetched it)."""
    if path.is_dir():
        return path
    return Path(snapshot_download(str(path), local_files_only=True))


def assemble_teacher(base: Path, export: Path, out: Path) -> Path:
    """A diffusers SDXL folder: the base's components (symlinked) with the export's UNet and scheduler."""
    if (out / "model_index.json").exists():
        return out
    with atomic_dir(out) as staging:
        for entry in local_model_folder(base).iterdir():
            if entry.name not in ("unet", "scheduler"):
                os.symlink(entry.resolve(), staging / entry.name)
        shutil.copytree(export / "unet", staging / "unet")
        shutil.copytree(export / "scheduler", staging / "scheduler")
    return out


def finish_stage(base: Path, phase_dir: Path, lora_rank: int | None) -> None:
    """A finished stage's products: `teacher/` (the next stage's teacher) and, with a rank, the LoRA
    that puts the stage's model on the base (`base_lora/`, lora_extract.py)."""
    assemble_teacher(base, phase_dir / "export", phase_dir / "teacher")
    if lora_rank and not (phase_dir / BASE_LORA_DIR / INFO_FILE).exists():
        extract_to_folder(str(base), str(phase_dir / "export" / UNET_DIR), phase_dir / BASE_LORA_DIR, lora_rank)


def write_releases(root: Path, releases: dict[int, Path]) -> Path:
    """`releases.json`: for each step count the files users ship (the paper's released set)."""
    entries = {}
    for steps, phase_dir in sorted(releases.items(), reverse=True):
        export, lora = phase_dir / "export", phase_dir / BASE_LORA_DIR
        info = json.loads((export / INFO_FILE).read_text())
        entry = {
            "num_inference_steps": steps, "guidance_scale": 0.0, "prediction_type": info["prediction_type"],
            "pipeline": str(phase_dir / "teacher"), "unet": str(export / UNET_DIR),
            "scheduler": str(export / SCHEDULER_DIR),
        }
        if (export / SINGLE_FILE).exists():
            entry["single_file"] = str(export / SINGLE_FILE)
        if (lora / LORA_FILE).exists():  # on the base model; an x0 LoRA also needs the x0 scheduler
            entry.update(lora=str(lora / LORA_FILE), lora_kohya=str(lora / KOHYA_FILE))
        entries[f"{steps}step"] = entry
    with atomic_path(root / RELEASES_FILE) as temporary:
        temporary.write_text(json.dumps(entries, indent=2) + "\n")
    return root / RELEASES_FILE


def compose_train_config(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with `overrides`, inside or outside a running Hydra app."""
    if GlobalHydra.instance().is_initialized():  # inside python train.py (Hydra's app)
        return compose("train", overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def _user_overrides(overrides: list[str]) -> list[str]:
    return [
        o for o in overrides
        if override_key(o) not in PHASE_KEYS and not override_key(o).startswith(RECIPE_PREFIXES)
    ]


def run_recipe(cfg: DictConfig, overrides: list[str], extra_callbacks: list[L.Callback] = ()) -> Path:
    """Run (or finish) every phase of `cfg.recipe`; returns the final teacher folder.

    Several devices: Lightning's DDP launcher re-runs this command once per device when the first
    phase trains; every rank then walks the same phases, each phase's `train` joins the same
    process group, and global rank 0 alone writes a finished phase's teacher and `DONE` between
    two barriers, so no rank reads a file before it is complete.

    Args:
        cfg: the composed config of the recipe command (its `recipe` block and `output_dir`).
        overrides: the command line's overrides, applied to every phase (model, data, trainer...).
        extra_callbacks: added to every phase (tests).
    """
    root = Path(cfg.output_dir)
    base = Path(str(cfg.model.path))
    common = _user_overrides(overrides) + list(cfg.recipe.phase_overrides)
    if cfg.recipe.phase_experiment:
        common.append(f"experiment={cfg.recipe.phase_experiment}")
    phases = recipe_phases(cfg.recipe)
    skip_levels = skip_level_teachers(cfg.recipe, phases)
    # Every phase's config is checked before the first one trains (teachers do not exist yet).
    for phase in phases:
        validate_config(compose_train_config(common + phase.overrides + phase.extra + [f"model.path={base}"]))
    teacher, previous = base, None
    steps = stage_config(cfg.recipe.first_stage or cfg.recipe.stages[0]).teacher_steps
    models = {steps: base}  # steps -> the teacher folder of the model sampled with that many steps
    releases: dict[int, Path] = {}  # steps -> the phase folder of the stage result sampled with them
    lora_rank = cfg.recipe.get("base_lora_rank")
    for index, phase in enumerate(phases):
        phase_dir = root / f"{index:02d}_{phase.name}"
        init = {"lora": LORA_FILE, "unet": UNET_DIR}.get(phase.init_from)
        phase_overrides = [f"model.path={teacher}", f"student_init={previous / 'export' / init}" if init else "student_init=null"]
        if phase.continues_discriminator:
            phase_overrides.append(f"discriminator.init={previous / 'export' / DISCRIMINATOR_FILE}")
        if index in skip_levels:
            level = skip_levels[index]
            phase_overrides += [f"teacher_path={models[level]}", f"stage.teacher_steps={level}"]
        exported = (phase_dir / "export" / INFO_FILE).is_file()  # export_info.json is written last
        if (phase_dir / DONE).exists() and not exported:  # marked by an older version after a killed export
            log.warning("Recipe: %s is marked done but has no export; resuming it to write one", phase.name)
        if (phase_dir / DONE).exists() and exported:
            log.info("Recipe: %s is done, skipped", phase.name)
            if phase.ends_stage and rank_zero_only.rank == 0:  # finished by an older version
                finish_stage(base, phase_dir, lora_rank if phase.result_steps else None)
        else:
            resume = (phase_dir / "checkpoints" / "last.ckpt").exists()
            log.info("Recipe: %s (%s)", phase.name, "resuming" if resume else "starting")
            phase_cfg = compose_train_config(
                common + phase.overrides + phase.extra + phase_overrides + (["ckpt_path=last"] if resume else [])
            )
            with open_dict(phase_cfg):
                phase_cfg.output_dir = str(phase_dir)
                if not phase.result_steps and "export" in (phase_cfg.get("callbacks") or {}):
                    # Only a stage's result ships (releases.json): an SDXL single file is 7-14 GB.
                    phase_cfg.callbacks.export.single_file = False
            trainer = train(phase_cfg, extra_callbacks=list(extra_callbacks))
            trainer.strategy.barrier("recipe_phase_trained")  # rank 0 has written the export
            if trainer.is_global_zero:
                if not (phase_dir / "export" / INFO_FILE).is_file():
                    raise RuntimeError(f"Recipe: {phase.name} trained but {phase_dir / 'export'} is incomplete; rerun to repair it.")
                if phase.ends_stage:
                    finish_stage(base, phase_dir, lora_rank if phase.result_steps else None)
                (phase_dir / DONE).write_text(json.dumps({"phase": phase.name, "overrides": phase_overrides}))
            trainer.strategy.barrier("recipe_phase_done")
        previous = phase_dir
        if phase.ends_stage:
            teacher = phase_dir / "teacher"
            steps = phase.result_steps or steps  # the x0 conversion keeps its teacher's steps
            models[steps] = teacher
            if phase.result_steps:  # a stage's result (not the x0 conversion, an intermediate)
                releases[steps] = phase_dir
                if rank_zero_only.rank == 0:
                    write_releases(root, releases)
    return teacher
