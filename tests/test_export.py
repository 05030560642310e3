"""Exports load in stock diffusers and reproduce the student (METHOD.md 5)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from conftest import compose_config
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from omegaconf import open_dict
from safetensors.torch import load_file, save_file

from lightning_sdxl.errors import RefusedOverwrite
from lightning_sdxl.export import (
    COMFYUI_FILE,
    DISCRIMINATOR_FILE,
    INFO_FILE,
    KOHYA_FILE,
    LORA_FILE,
    SCHEDULER_DIR,
    SINGLE_FILE,
    UNET_DIR,
    export_student,
)
from lightning_sdxl.io import OWNED_MARKER, atomic_dir

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a large red circle at the top left on a white background", "a small blue square"]
SEEDS = torch.tensor([3, 11])


def build_perturbed_module(tiny_sdxl_path: str, output_dir: Path, *overrides: str):
    """A module whose student is moved away from the teacher, so an export of the teacher fails the tests."""
    cfg = compose_config(list(overrides), output_dir)
    with open_dict(cfg):
        cfg.model.path = tiny_sdxl_path
    module = hydra.utils.instantiate(cfg.module).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in module.pair.unet.named_parameters():
            if parameter.requires_grad and ("lora_" not in name or "lora_B" in name):
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return module


def stock_pipeline(base: str, export: Path | None = None) -> StableDiffusionXLPipeline:
    """The base pipeline, with the exported UNet and scheduler when `export` is given."""
    parts = {}
    if export is not None:
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(export / UNET_DIR),
            "scheduler": EulerDiscreteScheduler.from_pretrained(export / SCHEDULER_DIR),
        }
    pipe = StableDiffusionXLPipeline.from_pretrained(base, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def single_file_pipeline(base: str, export: Path) -> StableDiffusionXLPipeline:
    """The export's all-in-one file read by diffusers' own single-file reader (offline: the base's
    configs), every component from the file: the tiny model's text encoders differ in width, as
    SDXL's do (diffusers 0.42 tells them apart by width alone; tests/test_single_file.py)."""
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(export / SINGLE_FILE),
        config=base,
        local_files_only=True,
        scheduler=EulerDiscreteScheduler.from_pretrained(export / SCHEDULER_DIR),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_output(unet: UNet2DConditionModel, module) -> torch.Tensor:
    """One forward on fixed inputs at a mid timestep."""
    condition = module.condition(PROMPTS)
    x_t = module.initial_noise(SEEDS)
    with torch.no_grad():
        return unet(x_t, torch.tensor([499, 499]), **condition.unet_kwargs).sample


@pytest.fixture(scope="module")
def lora_export(tiny_sdxl_path, tmp_path_factory):
    """A perturbed LoRA student with lora_alpha != rank (alpha 8, rank 4), and its export."""
    root = tmp_path_factory.mktemp("lora_export")
    module = build_perturbed_module(tiny_sdxl_path, root / "run", "student.lora_alpha=8")
    assert module.student_spec.lora_rank == 4
    return module, export_student(module, root / "export")


def assert_pipeline_reproduces_student(module, export: Path, base: str, single_file: bool = False) -> None:
    steps = module.stage.student_steps
    size = module.hparams.resolution
    expected = module.generate(PROMPTS, SEEDS, "student", steps)
    pipe = single_file_pipeline(base, export) if single_file else stock_pipeline(base, export)
    latents = pipe(
        PROMPTS,
        num_inference_steps=steps,
        guidance_scale=0.0,
        latents=module.initial_noise(SEEDS),
        height=size,
        width=size,
        output_type="latent",
    ).images
    assert torch.allclose(latents, expected, atol=1e-4, rtol=1e-4), (latents - expected).abs().max()
    teacher = module.generate(PROMPTS, SEEDS, "teacher", steps)
    assert (latents - teacher).abs().max() > 1e-2, (
        "the export reproduces the teacher, not the student"
    )


def test_lora_student_full_unet_export_reproduces_the_student(lora_export, tiny_sdxl_path):
    module, export = lora_export
    assert_pipeline_reproduces_student(module, export, tiny_sdxl_path)
    info = json.loads((export / INFO_FILE).read_text())
    assert info["prediction_type"] == "epsilon" and info["num_inference_steps"] == 4
    assert info["stage"] == "8to4" and info["loss"] == "cond_adv" and info["lora_alpha"] == 8
    assert (
        EulerDiscreteScheduler.from_pretrained(export / SCHEDULER_DIR).config.timestep_spacing
        == "trailing"
    )
    assert any(
        name.startswith("pair.unet.") and "lora_" in name for name, _ in module.named_parameters()
    ), "exporting must not merge or unload the training module's adapters"


def test_x0_full_student_export_reproduces_the_one_step_model(tiny_sdxl_path, tmp_path):
    module = build_perturbed_module(
        tiny_sdxl_path, tmp_path / "run", "student=full", "prediction=sample", "stage=2to1"
    )
    export = export_student(module, tmp_path / "export")
    assert (
        EulerDiscreteScheduler.from_pretrained(export / SCHEDULER_DIR).config.prediction_type
        == "sample"
    )
    assert sorted(path.name for path in export.iterdir()) == sorted(
        [COMFYUI_FILE, DISCRIMINATOR_FILE, INFO_FILE, OWNED_MARKER, SCHEDULER_DIR, SINGLE_FILE, UNET_DIR]
    )
    assert "x0" in json.loads((export / INFO_FILE).read_text())["comfyui"]
    assert_pipeline_reproduces_student(module, export, tiny_sdxl_path)
    assert_pipeline_reproduces_student(module, export, tiny_sdxl_path, single_file=True)


def test_lora_student_single_file_reproduces_the_student(lora_export, tiny_sdxl_path):
    module, export = lora_export
    assert_pipeline_reproduces_student(module, export, tiny_sdxl_path, single_file=True)


def test_diffusers_lora_unfused_and_fused_equals_the_merged_unet(lora_export, tiny_sdxl_path):
    module, export = lora_export
    merged = unet_output(UNet2DConditionModel.from_pretrained(export / UNET_DIR), module)
    pipe = stock_pipeline(tiny_sdxl_path)
    base = unet_output(pipe.unet, module)
    pipe.load_lora_weights(export, weight_name=LORA_FILE)
    unfused = unet_output(pipe.unet, module)
    pipe.fuse_lora()
    fused = unet_output(pipe.unet, module)
    assert (merged - base).abs().max() > 1e-2
    assert torch.allclose(unfused, merged, atol=1e-5), (unfused - merged).abs().max()
    assert torch.allclose(fused, merged, atol=1e-5), (fused - merged).abs().max()


def test_kohya_lora_has_kohya_keys_and_loads_like_the_diffusers_lora(lora_export, tiny_sdxl_path):
    module, export = lora_export
    state = load_file(export / KOHYA_FILE)
    assert all(key.startswith("lora_unet_") for key in state)
    # sd-scripts' SDXL (SGM) names, which A1111 maps whole; e.g. the up_blocks.0 upsampler is output_blocks.2.2.
    assert all(key.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
               for key in state), sorted(state)[:3]
    assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in state
    assert "lora_unet_input_blocks_1_0_emb_layers_1.alpha" in state  # down_blocks.0.resnets.0.time_emb_proj
    names = {key.split(".")[0] for key in state}
    assert {key.split(".", 1)[1] for key in state} == {
        "lora_down.weight",
        "lora_up.weight",
        "alpha",
    }
    assert all(
        f"{name}.{suffix}" in state
        for name in names
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha")
    )
    assert all(float(state[f"{name}.alpha"]) == 8.0 for name in names)
    assert len(names) == len(load_file(export / LORA_FILE)) // 2

    pipe = stock_pipeline(tiny_sdxl_path)
    pipe.load_lora_weights(export, weight_name=LORA_FILE)
    expected = unet_output(pipe.unet, module)
    pipe = stock_pipeline(tiny_sdxl_path)
    # diffusers' kohya path: lora_state_dict -> _convert_non_diffusers_lora_to_diffusers, alphas from `.alpha`.
    pipe.load_lora_weights(export, weight_name=KOHYA_FILE)
    kohya = unet_output(pipe.unet, module)
    assert torch.allclose(kohya, expected, atol=1e-5), (kohya - expected).abs().max()


def test_callback_exports_at_train_end_and_cli_reexports_last_checkpoint(make_config, tmp_path):
    from lightning_sdxl.train import train

    # One MSE batch, a checkpoint after it, no validation: the cheapest run that trains and saves.
    cfg = make_config(
        "loss=mse",
        "steps=1",
        "checkpoint.every_n_steps=1",
        "validation.every_n_steps=100",
        "logger=none",
        "student.lr=1e-2",
    )
    train(cfg)
    run = Path(cfg.output_dir)
    export = run / "export"
    assert {path.name for path in export.iterdir()} == {
        UNET_DIR,
        SCHEDULER_DIR,
        LORA_FILE,
        KOHYA_FILE,
        INFO_FILE,
        SINGLE_FILE,
        COMFYUI_FILE,
        OWNED_MARKER,
    }
    assert json.loads((export / INFO_FILE).read_text())["global_step"] == 1
    assert any(
        value.abs().max() > 0
        for key, value in load_file(export / KOHYA_FILE).items()
        if "lora_up" in key
    ), "the exported LoRA is the untrained one (B = 0)"
    assert not [path.name for path in run.iterdir() if path.name.startswith(".export")], (
        "temporary folders left"
    )

    again = tmp_path / "again"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_sdxl.export",
            "--checkpoint",
            str(run / "checkpoints" / "last.ckpt"),
            "--out",
            str(again),
        ],
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((again / INFO_FILE).read_text())["global_step"] == 1
    for name in (f"{UNET_DIR}/diffusion_pytorch_model.safetensors", LORA_FILE, KOHYA_FILE, SINGLE_FILE):
        written, reexported = load_file(export / name), load_file(again / name)
        assert written.keys() == reexported.keys()
        assert all(torch.equal(written[key], reexported[key]) for key in written), name


def test_atomic_dir_never_replaces_a_folder_it_did_not_write(tmp_path):
    """Issue 15: an export into a folder of the user's files deleted them with exit 0."""
    users = tmp_path / "thesis"
    users.mkdir()
    (users / "thesis.txt").write_text("years of work")
    with pytest.raises(RefusedOverwrite, match="did not write"), atomic_dir(users) as folder:
        raise AssertionError("the block must not run")  # refused before any work
    (tmp_path / "file").write_text("x")
    with pytest.raises(RefusedOverwrite, match="is a file"), atomic_dir(tmp_path / "file"):
        pass
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty") as folder:  # an empty folder is fine
        (folder / "a").write_text("1")
    older = tmp_path / "older_export"  # written before the marker: its export_info.json says whose
    older.mkdir()
    (older / "export_info.json").write_text("{}")
    with atomic_dir(older) as folder:
        (folder / "a").write_text("1")
    assert (users / "thesis.txt").read_text() == "years of work"
    assert (tmp_path / "file").read_text() == "x"


def test_atomic_dir_swaps_whole_folders_and_keeps_the_old_one_on_failure(tmp_path):
    target = tmp_path / "export"
    with atomic_dir(target) as folder:
        (folder / "old").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as folder:
        (folder / "new").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(path.name for path in target.iterdir()) == [OWNED_MARKER, "old"]
    with atomic_dir(target) as folder:
        (folder / "new").write_text("2")
        save_file({"w": torch.zeros(1)}, folder / "weights.safetensors")  # safetensors writes 0600
    assert sorted(path.name for path in target.iterdir()) == [OWNED_MARKER, "new", "weights.safetensors"]
    assert [path.name for path in tmp_path.iterdir()] == ["export"], "temporary folders left"
    umask = os.umask(0)
    os.umask(umask)
    for path in target.iterdir():  # readable by the group and others as the umask allows
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
