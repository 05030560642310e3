"""A distillation checkpoint's recorded module arguments, in the current form.

`DistillationModule` takes its stage, loss, student and discriminator as component configs (conf/
groups with a `_target_`). Checkpoints written before (up to commit b038ffe) recorded 40 flat
arguments; `upgrade` maps them onto the components' configs, so those checkpoints still load
(`DistillationModule.for_inference`), pass the resume checks and sample.
"""

from __future__ import annotations

from pathlib import Path

import torch

STAGE_GRID = "lightning_sdxl.diffusion.stage_grid.StageGrid"
SEGMENTED_STAGE = "lightning_sdxl.diffusion.segments.SegmentedStage"
LOSS = "lightning_sdxl.losses.DistillationLoss"
STUDENT = "lightning_sdxl.models.student.StudentSpec"
DISCRIMINATOR = "lightning_sdxl.models.discriminator.DiscriminatorSpec"

# The flat form's loss names: (regression, adversarial, conditional), as conf/loss/ sets them.
_FLAT_LOSSES = {
    "mse": (True, False, False),
    "cond_adv": (False, True, True),
    "uncond_adv": (False, True, False),
    "mse_adv": (True, True, False),
}
# Arguments both forms share.
_KEPT = ("model_path", "model_variant", "frozen_dtype", "prediction_type", "resolution", "validation_teacher_steps",
         "student_init", "teacher_path", "latent_cache", "seed")


def read_hparams(path: str | Path) -> dict:
    """A checkpoint's (or a sharded checkpoint's metadata file's) module arguments, upgraded; mmap
    reads the small dict, not the weights."""
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return upgrade(saved.get("hyper_parameters") or {})


def is_distillation(hparams: dict) -> bool:
    """Whether the (upgraded) arguments are a DistillationModule's (a teacher run's are not)."""
    return isinstance(hparams.get("stage"), dict) and "student_steps" in hparams["stage"]


def upgrade(hparams: dict) -> dict:
    """The arguments in the component form; already-current or non-distillation ones unchanged."""
    if "stage" in hparams or "student_steps" not in hparams:
        return dict(hparams)
    flat = hparams
    if flat.get("segments"):
        stage = {"_target_": SEGMENTED_STAGE, "name": f"tscd{flat['segments']}", "segments": flat["segments"],
                 "consistency_target": flat.get("consistency_target", "ema"), "ema_decay": flat.get("ema_decay", 0.95)}
    else:
        stage = {"_target_": STAGE_GRID, "start_timesteps": flat.get("start_timesteps"),
                 "pure_noise_weight": flat.get("pure_noise_weight", 1.0)}
    stage.update(teacher_steps=flat["teacher_steps"], student_steps=flat["student_steps"],
                 guidance_scale=flat.get("guidance_scale", 1.0))
    regression, adversarial, conditional = _FLAT_LOSSES[flat["loss"]]
    generator = dict(flat.get("generator_optimizer") or {})
    loss = {"_target_": LOSS, "name": flat["loss"], "regression": regression, "adversarial": adversarial,
            "conditional": conditional, "adam_betas": list(generator.get("betas", (0.9, 0.999)))}
    if adversarial:
        loss.update(renoise_timesteps=flat.get("renoise_timesteps"), renoise_weights=flat.get("renoise_weights"))
    if regression and adversarial:
        loss["adversarial_weight"] = flat.get("adversarial_weight", 1.0)
    student = {"_target_": STUDENT, "type": flat.get("student_type", "lora"), "lr": generator.pop("lr", 1.0e-6),
               "gradient_checkpointing": flat.get("gradient_checkpointing", "none")}
    if student["type"] == "lora":
        student.update(lora_rank=flat.get("lora_rank"), lora_alpha=flat.get("lora_alpha"),
                       lora_target_modules=flat.get("lora_target_modules"))
    discriminator = {
        "_target_": DISCRIMINATOR, "lr": (flat.get("discriminator_optimizer") or {}).get("lr", student["lr"]),
        "head_blocks": flat.get("head_blocks"), "head_channels": flat.get("head_channels"),
        "init": flat.get("discriminator_init"), "warmup": flat.get("discriminator_warmup", 0),
        "conditioning_fakes": flat.get("conditioning_fakes", False),
        "shared_forward": flat.get("shared_judgement", True),
        "gradient_checkpointing": flat.get("discriminator_checkpointing", "none"),
    }
    optim = {"optimizer": generator, "lr_scheduler": flat.get("lr_scheduler"),
             "gradient_clip_val": flat.get("gradient_clip_val", 1.0),
             "accumulate_grad_batches": flat.get("accumulate_grad_batches", 1),
             "max_nonfinite_steps": flat.get("max_nonfinite_steps", 3)}
    kept = {key: flat[key] for key in _KEPT if key in flat}
    return {**kept, "stage": stage, "loss": loss, "student": student, "discriminator": discriminator, "optim": optim}
