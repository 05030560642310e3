"""Walking a recipe's phases: each an ordinary `train(cfg)` run in `<output_dir>/<NN>_<phase>/`,
finished phases skipped, the unfinished one resumed, every rank in step (module docstring of
`lightning_sdxl.recipe`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
from lightning.fabric.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, open_dict

from lightning_sdxl.config_checks import validate_config
from lightning_sdxl.export import DISCRIMINATOR_FILE, INFO_FILE, LORA_FILE, UNET_DIR
from lightning_sdxl.recipe.plan import (
    first_teacher_steps,
    is_consistency_chain,
    recipe_phases,
    skip_level_teachers,
)
from lightning_sdxl.recipe.products import DONE, finish_stage, write_lora_releases, write_releases
from lightning_sdxl.run_config import compose_train_config, override_key
from lightning_sdxl.train import train

log = logging.getLogger(__name__)
# Keys each phase sets itself; the user's own values for them are dropped from the phase overrides
# (group choices and paths only: `student.lr=...` or `loss.renoise_weights=...` pass through).
PHASE_KEYS = {
    "stage", "loss", "student", "prediction", "student_init", "teacher_path", "discriminator.init", "model.path",
    "ckpt_path", "output_dir", "experiment",
}
RECIPE_PREFIXES = ("recipe", "hydra")


def _user_overrides(overrides: list[str]) -> list[str]:
    return [
        o for o in overrides
        if override_key(o) not in PHASE_KEYS and not override_key(o).startswith(RECIPE_PREFIXES)
    ]


def run_recipe(cfg: DictConfig, overrides: list[str], extra_callbacks: list[L.Callback] = ()) -> Path:
    """Run (or finish) every phase of `cfg.recipe`; returns the final teacher folder (a TSCD
    chain's: its last phase's export, which holds the LoRA for every step count).

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
    if cfg.recipe.get("phase_experiment"):  # the recipe group alone (recipe=progressive) runs the default experiment
        common.append(f"experiment={cfg.recipe.phase_experiment}")
    phases = recipe_phases(cfg.recipe)
    skip_levels = skip_level_teachers(cfg.recipe, phases)
    # Every phase's config is checked before the first one trains (teachers do not exist yet).
    for phase in phases:
        validate_config(compose_train_config(common + phase.overrides + phase.extra + [f"model.path={base}"]))
    teacher, previous = base, None
    steps = first_teacher_steps(cfg.recipe)
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
                if not phase.ships and "export" in (phase_cfg.get("callbacks") or {}):
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
    if is_consistency_chain(cfg.recipe):
        if rank_zero_only.rank == 0:
            write_lora_releases(root, previous / "export", base, cfg.recipe.release_steps)
        return previous / "export"
    return teacher
