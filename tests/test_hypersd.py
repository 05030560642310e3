"""Hyper-SD's TSCD chain (METHOD.md 7): k = 8 -> 4 -> 2 -> 1 in one resumable command, and its one
LoRA sampled at 1, 2, 4 and 8 steps by a stock diffusers pipeline with TCDScheduler. The chain's
tests share one run of it (about 45 s with them), so they are in `pytest -m slow`, which CI runs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CPU_OVERRIDES, compose_config
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, TCDScheduler
from test_recipe import Bomb, StartSpy

from lightning_sdxl.errors import ConfigError
from lightning_sdxl.export import KOHYA_FILE, LORA_FILE
from lightning_sdxl.recipe import DONE, RELEASES_FILE, recipe_phases, run_recipe

STEP_COUNTS = (1, 2, 4, 8)


def test_the_chain_merges_segments_with_one_lora_and_a_growing_adversarial_weight():
    phases = recipe_phases(compose_config(["experiment=toy_hypersd"]).recipe)
    assert [phase.name for phase in phases] == ["tscd8_mse", "tscd4_mse", "tscd2_mse_adv", "tscd1_mse_adv"]
    assert [phase.init_from for phase in phases] == [None, "lora", "lora", "lora"]  # one LoRA throughout
    assert all("student=lora" in phase.overrides and "stage=tscd" in phase.overrides for phase in phases)
    assert [o for o in phases[3].overrides if o.startswith("loss")] == ["loss=mse_adv", "loss.adversarial_weight=0.2"]
    assert [phase.continues_discriminator for phase in phases] == [False, False, False, True]
    assert not any(phase.ends_stage for phase in phases)  # the base model teaches every phase


@pytest.mark.parametrize(("override", "match"), [
    ("recipe.adversarial_weights=[0,0.1]", "one weight >= 0 per entry"),
    ("recipe.segments=[4,8,2,1]", "k must shrink"),
])
def test_a_malformed_chain_is_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        recipe_phases(compose_config(["experiment=toy_hypersd", override]).recipe)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """The toy chain at 2 batches per phase (tiny model, a large lr so the LoRA visibly acts),
    interrupted in its third phase and resumed by the same command."""
    root = tmp_path_factory.mktemp("hypersd") / "chain"
    overrides = [*CPU_OVERRIDES, "experiment=toy_hypersd", "steps=2", "checkpoint.every_n_steps=1",
                 "validation.every_n_steps=2", "student.lr=1e-3"]
    cfg = compose_config(overrides[len(CPU_OVERRIDES):], root)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_recipe(cfg, overrides, extra_callbacks=[Bomb("02_tscd2_mse_adv", batches=2)])
    spy = StartSpy()
    export = run_recipe(cfg, overrides, extra_callbacks=[spy])
    return root, export, spy.starts, cfg


@pytest.mark.slow
def test_the_chain_resumes_and_releases_one_lora_for_every_step_count(chain):
    root, export, starts, _ = chain
    assert sorted(p.parent.name for p in root.glob(f"*/{DONE}")) == [
        "00_tscd8_mse", "01_tscd4_mse", "02_tscd2_mse_adv", "03_tscd1_mse_adv"]
    # Finished phases were skipped; the interrupted one resumed from its checkpoint after batch 1.
    assert set(starts) == {"02_tscd2_mse_adv", "03_tscd1_mse_adv"} and starts["02_tscd2_mse_adv"] > 0
    assert export == root / "03_tscd1_mse_adv" / "export"
    info = json.loads((export / "export_info.json").read_text())
    assert info["stage"].startswith("tscd1") and info["student_type"] == "lora" and "TCDScheduler" in info["scheduler"]
    releases = json.loads((root / RELEASES_FILE).read_text())
    assert list(releases) == [f"{steps}step" for steps in sorted(STEP_COUNTS, reverse=True)]
    assert {entry["lora"] for entry in releases.values()} == {str(export / LORA_FILE)}
    assert (export / KOHYA_FILE).exists()


def tiny_images(pipe, steps: int) -> torch.Tensor:
    prompts = ["a red circle", "a blue square"]
    generator = torch.Generator().manual_seed(0)
    kwargs = {"eta": 0.0} if isinstance(pipe.scheduler, TCDScheduler) else {}
    return pipe(prompts, num_inference_steps=steps, guidance_scale=0.0, height=64, width=64, generator=generator,
                output_type="pt", **kwargs).images


@pytest.mark.slow
def test_one_exported_lora_samples_at_1_2_4_and_8_steps_with_the_tcd_scheduler(chain):
    """Hyper-SD's users' path: the base pipeline, the LoRA file, TCDScheduler. In diffusers 0.42 its
    k-step grid is the trailing grid the segments end on, and at eta 0 a TCD step is the DDIM move
    the student was trained with, so it lands where trailing Euler (the export's scheduler) does
    except at x_999 (Euler feeds sqrt(1 - a_999) x noise: METHOD.md, Project choices)."""
    _, export, _, cfg = chain
    pipe = StableDiffusionXLPipeline.from_pretrained(str(cfg.model.path))
    pipe.set_progress_bar_config(disable=True)
    base_tcd = TCDScheduler.from_config(pipe.scheduler.config)
    without_lora = {steps: tiny_images(_with(pipe, base_tcd), steps) for steps in STEP_COUNTS}
    pipe.load_lora_weights(export, weight_name=LORA_FILE)
    euler = EulerDiscreteScheduler.from_pretrained(export / "scheduler")
    for steps in STEP_COUNTS:
        tcd = tiny_images(_with(pipe, TCDScheduler.from_config(pipe.scheduler.config)), steps)
        assert tcd.shape == (2, 3, 64, 64) and torch.isfinite(tcd).all()
        trailing = tiny_images(_with(pipe, euler), steps)
        lora_effect = (tcd - without_lora[steps]).abs().max().item()
        scheduler_gap = (tcd - trailing).abs().max().item()
        assert lora_effect > 1e-2, f"{steps} steps: the LoRA did not change the images"
        assert scheduler_gap < 0.1 * lora_effect, f"{steps} steps: TCD {scheduler_gap} from trailing Euler"


def _with(pipe: StableDiffusionXLPipeline, scheduler) -> StableDiffusionXLPipeline:
    pipe.scheduler = scheduler
    return pipe


@pytest.mark.slow
def test_the_sample_command_takes_the_chain_s_release(chain, tmp_path):
    """`python -m lightning_sdxl.sample <run>/releases.json`: the chain's model (its export, the base
    with the LoRA merged, not the bare base) at every listed step count."""
    from lightning_sdxl import sample

    root, export, _, _ = chain
    sample.main([str(root / RELEASES_FILE), "--prompt", "a red circle", "--out", str(tmp_path / "out")])
    records = json.loads((tmp_path / "out" / sample.INDEX_FILE).read_text())
    assert sorted(record["steps"] for record in records) == sorted(STEP_COUNTS)
    assert {record["source"] for record in records} == {str(export / "unet")}
