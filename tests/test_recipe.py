"""The progressive recipe: phase order, chaining, interruption and resume (reduced steps)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from conftest import CPU_OVERRIDES, compose_config
from diffusers import StableDiffusionXLPipeline

from lightning_sdxl.recipe import DONE, recipe_phases, run_recipe


def test_paper_recipe_phase_order():
    cfg = compose_config(["experiment=toy_recipe"])
    names = [phase.name for phase in recipe_phases(cfg.recipe)]
    stages = ["32to8", "8to4", "4to2"]
    expected = ["128to32_mse"] + [f"{s}_{p}" for s in stages for p in ("a_lora_cond", "b_lora_uncond", "c_full_uncond")]
    expected += ["x0_conversion", "2to1_a_lora_cond", "2to1_b_lora_uncond", "2to1_c_full_uncond"]
    assert names == expected


def test_mse_baseline_recipe_has_the_same_phases_with_mse_only():
    adversarial = recipe_phases(compose_config(["experiment=toy_recipe"]).recipe)
    baseline = recipe_phases(compose_config(["experiment=toy_recipe", "recipe.adversarial=false"]).recipe)
    assert len(baseline) == len(adversarial) and baseline[0].name == adversarial[0].name
    losses = {o for phase in baseline for o in phase.overrides if o.startswith("loss=")}
    assert losses == {"loss=mse"}
    assert [p.init_from for p in baseline] == [p.init_from for p in adversarial]


def phase_name(trainer) -> str:
    return Path(trainer.checkpoint_callback.dirpath).parent.name


class Bomb(L.Callback):
    """Interrupts the phase whose run folder ends with `phase` after `batches` batches."""

    def __init__(self, phase: str, batches: int):
        self.phase, self.batches = phase, batches

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if phase_name(trainer) == self.phase and batch_idx + 1 >= self.batches:
            raise RuntimeError("interrupted")


class StartSpy(L.Callback):
    def __init__(self):
        self.starts = {}

    def on_train_start(self, trainer, pl_module):
        self.starts[phase_name(trainer)] = trainer.global_step


def test_one_step_stage_chains_phases_and_resumes_after_an_interruption(tmp_path):
    overrides = [*CPU_OVERRIDES, "experiment=toy_recipe", "recipe.first_stage=null", "recipe.stages=[2to1]",
                 "steps=4", "checkpoint.every_n_steps=2", "validation.every_n_steps=4"]
    cfg = compose_config(overrides[len(CPU_OVERRIDES):], tmp_path / "recipe")
    with pytest.raises(RuntimeError, match="interrupted"):
        run_recipe(cfg, overrides, extra_callbacks=[Bomb("02_2to1_b_lora_uncond", batches=3)])
    root = tmp_path / "recipe"
    done = {path.parent.name: path.stat().st_mtime_ns for path in root.glob(f"*/{DONE}")}
    assert sorted(done) == ["00_x0_conversion", "01_2to1_a_lora_cond"]
    assert (root / "02_2to1_b_lora_uncond" / "checkpoints" / "last.ckpt").exists()

    spy = StartSpy()
    teacher = run_recipe(cfg, overrides, extra_callbacks=[spy])
    # Finished phases are not redone; the interrupted one resumes from its checkpoint (2 batches x 2 steps).
    assert set(spy.starts) == {"02_2to1_b_lora_uncond", "03_2to1_c_full_uncond"}
    assert spy.starts["02_2to1_b_lora_uncond"] == 4 and spy.starts["03_2to1_c_full_uncond"] == 0
    assert all((root / name / DONE).stat().st_mtime_ns == stamp for name, stamp in done.items())
    # The final teacher is a standard SDXL folder holding the 1-step x0 model.
    assert teacher == root / "03_2to1_c_full_uncond" / "teacher"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(teacher))
    assert pipe.scheduler.config.prediction_type == "sample"
    assert pipe.scheduler.config.timestep_spacing == "trailing"


@pytest.mark.slow
def test_full_toy_recipe_runs_every_stage_and_phase(tmp_path):
    overrides = [*CPU_OVERRIDES, "experiment=toy_recipe"]
    cfg = compose_config(overrides[len(CPU_OVERRIDES):], tmp_path / "recipe")
    run_recipe(cfg, overrides)
    assert len(list((tmp_path / "recipe").glob(f"*/{DONE}"))) == 14  # 128to32, 3 x 3 stages, x0, 2to1 x 3


def test_user_overrides_reach_every_phase_except_what_phases_set():
    from lightning_sdxl.recipe import _user_overrides

    given = ["experiment=toy_recipe", "stage=8to4", "loss=mse", "student=full", "student.lr=3e-4",
             "loss.renoise_weights=[5,1,1,1]", "model.path=/x", "recipe.stages=[2to1]", "data=folder", "data.root=/d"]
    assert _user_overrides(given) == ["student.lr=3e-4", "loss.renoise_weights=[5,1,1,1]", "data=folder", "data.root=/d"]
