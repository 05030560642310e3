"""A recipe's phases (METHOD.md 2-4): which stage, loss and student each trains, what it starts
from, which phases end a stage, and which take the skip-level teacher."""

from __future__ import annotations

from dataclasses import dataclass, field

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


def stage_config(name: str) -> DictConfig:
    return OmegaConf.load(CONF_DIR / "stage" / f"{name}.yaml")


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


