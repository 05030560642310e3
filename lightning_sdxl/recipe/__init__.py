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

Hyper-SD's TSCD chain (`experiment=toy_hypersd` / `sdxl_hypersd`, METHOD.md 7) walks the same way:
one LoRA on the base model through k = 8, 4, 2, 1 segments, each phase continuing the previous one's
LoRA, the base model teaching every phase; `releases.json` lists the last LoRA for 1, 2, 4 and 8 steps.

Modules: `plan.py` (the phases and skip-level teachers of a recipe config), `products.py` (what a
finished stage leaves: teacher folder, base LoRA, releases.json), `run.py` (walking the phases).
Entry points: `python train.py experiment=toy_recipe` or `python -m lightning_sdxl.recipe experiment=...`.
"""

from lightning_sdxl.recipe.plan import Phase, recipe_phases, skip_level_teachers, stage_config
from lightning_sdxl.recipe.products import (
    BASE_LORA_DIR,
    DONE,
    RELEASES_FILE,
    assemble_teacher,
    finish_stage,
    local_model_folder,
    write_lora_releases,
    write_releases,
)
from lightning_sdxl.recipe.run import run_recipe

__all__ = [
    "BASE_LORA_DIR", "DONE", "RELEASES_FILE", "Phase", "assemble_teacher", "finish_stage", "local_model_folder",
    "recipe_phases", "run_recipe", "skip_level_teachers", "stage_config", "write_lora_releases", "write_releases",
]
