"""A recipe's phases (METHOD.md 2-4, 7): which stage, loss and student each trains, what it starts
from, which phases end a stage, and which take the skip-level teacher; or Hyper-SD's TSCD chain."""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import pairwise

from omegaconf import DictConfig, OmegaConf

from lightning_sdxl import CONF_DIR
from lightning_sdxl.errors import ConfigError


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
    ships: bool = False  # its export is released (a stage's result; a TSCD chain's last phase): single file too


def stage_config(name: str) -> DictConfig:
    return OmegaConf.load(CONF_DIR / "stage" / f"{name}.yaml")


def is_consistency_chain(recipe: DictConfig) -> bool:
    """Hyper-SD's TSCD chain (`recipe.segments`, conf/recipe/hypersd.yaml) rather than the
    progressive recipe (conf/recipe/progressive.yaml)."""
    return bool(recipe.get("segments"))


def first_teacher_steps(recipe: DictConfig) -> int:
    """The step count of the base model's grid in the recipe's first phase."""
    if is_consistency_chain(recipe):
        return stage_config("tscd").teacher_steps
    return stage_config(recipe.first_stage or recipe.stages[0]).teacher_steps


def consistency_phases(recipe: DictConfig) -> list[Phase]:
    """Hyper-SD's TSCD chain (METHOD.md 7): one LoRA trained on the base model through k =
    recipe.segments (8, 4, 2, 1), each phase starting from the previous phase's LoRA; the distance
    is MSE where `recipe.adversarial_weights` holds 0 and MSE + lambda x adversarial (loss=mse_adv)
    where it holds lambda. The teacher is the base model throughout; D continues between
    consecutive adversarial phases."""
    segments, weights = list(recipe.segments), list(recipe.adversarial_weights)
    if len(weights) != len(segments) or any(w < 0 for w in weights):
        raise ConfigError(
            f"recipe.adversarial_weights={weights} must give one weight >= 0 per entry of recipe.segments={segments} "
            "(0: MSE only)."
        )
    if any(later >= earlier for earlier, later in pairwise(segments)):
        raise ConfigError(f"recipe.segments={segments}: Hyper-SD merges segments, so k must shrink, e.g. [8, 4, 2, 1].")
    phases = []
    for index, (k, weight) in enumerate(zip(segments, weights)):
        loss = ["loss=mse_adv", f"loss.adversarial_weight={weight}"] if weight else ["loss=mse"]
        stage = ["stage=tscd", f"stage.segments={k}", f"stage.guidance_scale={recipe.guidance_scale}"]
        phases.append(Phase(
            f"tscd{k}_{'mse_adv' if weight else 'mse'}", [*stage, *loss, "student=lora"],
            "lora" if index else None, result_steps=k, ships=index == len(segments) - 1,
            continues_discriminator=bool(weight and index and weights[index - 1]),
        ))
    return phases


def recipe_phases(recipe: DictConfig) -> list[Phase]:
    """The phase list of `recipe` (conf/recipe/)."""
    if is_consistency_chain(recipe):
        return consistency_phases(recipe)
    phases = []
    if recipe.first_stage:
        phases.append(Phase(
            f"{recipe.first_stage}_mse", [f"stage={recipe.first_stage}", "loss=mse", "student=full"],
            ends_stage=True, extra=list(recipe.mse_overrides),
            result_steps=stage_config(recipe.first_stage).student_steps, ships=True,
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
                ends_stage=True, result_steps=steps, ships=True, continues_discriminator=carry, skip_level=skip,
            ),
        ]
    return phases


def skip_level_teachers(recipe: DictConfig, phases: list[Phase]) -> dict[int, int]:
    """Phase index -> the steps of its skip-level teacher: the model one level above its teacher
    (METHOD.md 4: the 2 to 1 stage's unconditional phases learn from the 4-step model, 4 to 2's from
    the 8-step one). Raises ConfigError when the recipe never had that model."""
    if is_consistency_chain(recipe):
        return {}  # the base model teaches every phase
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


