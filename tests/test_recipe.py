"""The progressive recipe: phase order, chaining, interruption and resume (reduced steps)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import CPU_OVERRIDES, compose_config
from diffusers import StableDiffusionXLPipeline

from lightning_sdxl.errors import ConfigError
from lightning_sdxl.recipe import (
    BASE_LORA_DIR,
    DONE,
    RELEASES_FILE,
    recipe_phases,
    run_recipe,
    skip_level_teachers,
)


def test_paper_recipe_phase_order():
    cfg = compose_config(["experiment=toy_recipe"])
    names = [phase.name for phase in recipe_phases(cfg.recipe)]
    stages = ["32to8", "8to4", "4to2"]
    expected = ["128to32_mse"] + [f"{s}_{p}" for s in stages for p in ("a_lora_cond", "b_lora_uncond", "c_full_uncond")]
    expected += ["x0_conversion", "2to1_a_lora_cond", "2to1_b_lora_uncond", "2to1_c_full_uncond"]
    assert names == expected


def test_discriminator_is_continued_within_a_stage_and_rebuilt_at_each_stage():
    phases = recipe_phases(compose_config(["experiment=toy_recipe", "recipe.discriminator_per_stage=true"]).recipe)
    continued = [phase.name for phase in phases if phase.continues_discriminator]
    assert continued == [f"{s}_{p}" for s in ("32to8", "8to4", "4to2", "2to1") for p in ("b_lora_uncond", "c_full_uncond")]
    per_phase = recipe_phases(compose_config(["experiment=toy_recipe", "recipe.discriminator_per_stage=false"]).recipe)
    assert not any(phase.continues_discriminator for phase in per_phase)


def test_skip_level_teachers_are_the_models_one_level_up():
    cfg = compose_config(["experiment=toy_recipe", "recipe.skip_level_stages=[4to2,2to1]"])
    phases = recipe_phases(cfg.recipe)
    plan = {phases[index].name: steps for index, steps in skip_level_teachers(cfg.recipe, phases).items()}
    # 4 to 2 learns from the 8-step model; 2 to 1 (after the x0 conversion) from the 4-step one.
    assert plan == {"4to2_b_lora_uncond": 8, "4to2_c_full_uncond": 8, "2to1_b_lora_uncond": 4, "2to1_c_full_uncond": 4}
    assert skip_level_teachers(compose_config(["experiment=toy_recipe"]).recipe, phases[:0]) == {}

    short = compose_config(["experiment=toy_recipe", "recipe.first_stage=null", "recipe.stages=[2to1]",
                            "recipe.skip_level_stages=[2to1]"])
    with pytest.raises(ConfigError, match="recipe.skip_level_stages"):
        skip_level_teachers(short.recipe, recipe_phases(short.recipe))


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
    # What users ship: the 1-step model's files, and its LoRA for the base model.
    releases = json.loads((root / RELEASES_FILE).read_text())
    assert list(releases) == ["1step"] and releases["1step"]["prediction_type"] == "sample"
    for key in ("unet", "scheduler", "single_file", "lora", "lora_kohya", "pipeline"):
        assert Path(releases["1step"][key]).exists(), key
    assert Path(releases["1step"]["lora"]).parent == root / "03_2to1_c_full_uncond" / BASE_LORA_DIR
    # Only stage results write the single file (an SDXL one is 7-14 GB).
    assert not list(root.glob("0[0-2]_*/export/sdxl_single_file.safetensors"))


@pytest.mark.slow
def test_full_toy_recipe_runs_every_stage_and_phase(tmp_path):
    overrides = [*CPU_OVERRIDES, "experiment=toy_recipe"]
    cfg = compose_config(overrides[len(CPU_OVERRIDES):], tmp_path / "recipe")
    run_recipe(cfg, overrides)
    assert len(list((tmp_path / "recipe").glob(f"*/{DONE}"))) == 14  # 128to32, 3 x 3 stages, x0, 2to1 x 3


@pytest.mark.slow
def test_recipe_on_two_ddp_processes_with_a_skip_level_teacher(tmp_path):
    """The recipe command with trainer.devices=2 (Lightning re-launches it per rank): both ranks walk
    every phase in step, rank 0 writes each teacher and DONE, and a second run skips them all."""
    command = [
        sys.executable, "train.py", *CPU_OVERRIDES, "experiment=toy_recipe", "recipe.first_stage=null",
        "recipe.stages=[4to2,2to1]", "recipe.skip_level_stages=[2to1]", "recipe.discriminator_per_stage=true", "steps=4", "checkpoint.every_n_steps=2",
        "validation.every_n_steps=4", "trainer.devices=2", f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    repo = Path(__file__).resolve().parents[1]
    first = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    names = ["00_4to2_a_lora_cond", "01_4to2_b_lora_uncond", "02_4to2_c_full_uncond", "03_x0_conversion",
             "04_2to1_a_lora_cond", "05_2to1_b_lora_uncond", "06_2to1_c_full_uncond"]
    assert sorted(path.parent.name for path in tmp_path.glob(f"*/{DONE}")) == names
    rank_1 = (tmp_path / "train_ddp_process_1.log").read_text()
    assert all(f"Recipe: {name[3:]} (starting)" in rank_1 for name in names)  # rank 1 trained every phase
    info = json.loads((tmp_path / "05_2to1_b_lora_uncond" / "export" / "export_info.json").read_text())
    # The student starts from the x0-converted 2-step model; its teacher is the 4-step one (the base here).
    assert info["base_model"] == "teacher"  # the 03_x0_conversion folder's teacher/, by name (no absolute path)
    assert Path(info["teacher"]).name.startswith("tiny-sdxl")
    assert info["stage"] == "4to1" and info["prediction_type"] == "sample"
    done = json.loads((tmp_path / "05_2to1_b_lora_uncond" / DONE).read_text())["overrides"]
    assert f"discriminator.init={tmp_path / '04_2to1_a_lora_cond' / 'export' / 'discriminator.safetensors'}" in done
    assert (tmp_path / "06_2to1_c_full_uncond" / "teacher" / "model_index.json").exists()
    assert list(json.loads((tmp_path / RELEASES_FILE).read_text())) == ["2step", "1step"]

    second = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert second.returncode == 0, second.stderr[-3000:]
    log = second.stdout + second.stderr
    assert log.count("is done, skipped") == len(names) and "(starting)" not in log and "(resuming)" not in log


@pytest.mark.slow
def test_recipe_under_fsdp_on_two_processes(tmp_path):
    """The recipe with trainer=fsdp (2 gloo processes): every phase shards, trains, exports and
    hands its result on (the x0 conversion's teacher, the 1-step release and its base LoRA)."""
    overrides = [o for o in CPU_OVERRIDES if not o.startswith("trainer=")]
    command = [
        sys.executable, "train.py", *overrides, "experiment=toy_recipe", "recipe.first_stage=null",
        "recipe.stages=[2to1]", "trainer=fsdp", "trainer.devices=2", "trainer.accelerator=cpu",
        "trainer.strategy.param_dtype=null", "steps=2", "checkpoint.every_n_steps=2", "validation.every_n_steps=2",
        "logger=none", f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                            timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    names = ["00_x0_conversion", "01_2to1_a_lora_cond", "02_2to1_b_lora_uncond", "03_2to1_c_full_uncond"]
    assert sorted(path.parent.name for path in tmp_path.glob(f"*/{DONE}")) == names
    assert all((tmp_path / name / "checkpoints" / "last.ckpt").is_dir() for name in names)  # folders of shards: FSDP
    assert list(json.loads((tmp_path / RELEASES_FILE).read_text())) == ["1step"]
    assert (tmp_path / "03_2to1_c_full_uncond" / BASE_LORA_DIR / "lora.safetensors").exists()


def test_user_overrides_reach_every_phase_except_what_phases_set():
    from lightning_sdxl.recipe.run import _user_overrides

    given = ["experiment=toy_recipe", "stage=8to4", "loss=mse", "student=full", "student.lr=3e-4",
             "loss.renoise_weights=[5,1,1,1]", "model.path=/x", "recipe.stages=[2to1]", "data=folder", "data.root=/d"]
    assert _user_overrides(given) == ["student.lr=3e-4", "loss.renoise_weights=[5,1,1,1]", "data=folder", "data.root=/d"]


def test_a_hub_id_base_is_assembled_from_its_cached_snapshot(tiny_sdxl_path, tmp_path, monkeypatch):
    """model.path=stabilityai/stable-diffusion-xl-base-1.0: teachers link the cached snapshot's parts."""
    from lightning_sdxl.recipe import products as recipe

    asked = []
    monkeypatch.setattr(recipe, "snapshot_download", lambda repo, local_files_only: asked.append(
        (repo, local_files_only)) or tiny_sdxl_path)
    export = tmp_path / "export"
    for part in ("unet", "scheduler"):
        shutil.copytree(Path(tiny_sdxl_path) / part, export / part)
    teacher = recipe.assemble_teacher(Path("org/sdxl-base"), export, tmp_path / "teacher")
    assert asked == [("org/sdxl-base", True)]
    assert (teacher / "text_encoder_2").resolve() == (Path(tiny_sdxl_path) / "text_encoder_2").resolve()
    assert StableDiffusionXLPipeline.from_pretrained(str(teacher)).unet is not None


@pytest.mark.slow  # 17 s: a fresh interpreter (pytest -m slow, which CI runs)
def test_the_recipe_entry_refuses_a_config_without_a_recipe(tmp_path):
    import sys

    command = [sys.executable, "-m", "lightning_sdxl.recipe", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 2 and "experiment=toy_recipe" in result.stderr
