"""Every ```python block of README.md runs as written and does what the text around it says.

Only placeholders are substituted: the `base = "..."` line (the user's base model) gets the tiny
SDXL, and `"export/` the folder of a real export of a tiny LoRA student (moved away from its base,
as in tests/test_export.py). The blocks run from the repository root, as the README says, each in a
fresh namespace, so each must import and define what it uses.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_export import build_perturbed_module

from lightning_sdxl.export import LORA_FILE, export_student

REPO = Path(__file__).resolve().parents[1]
SNIPPETS = re.findall(
    r"^```python\n(.*?)^```$", (REPO / "README.md").read_text(), re.MULTILINE | re.DOTALL
)
BASE_LINE = re.compile(r'^base = "[^"]*"', re.MULTILINE)


def kind(code: str) -> str:
    """Which README block this is, by what it loads."""
    if "TCDScheduler" in code:
        return "tcd"
    if "load_lora_weights" in code:
        return "lora"
    if '"export/unet"' in code:
        return "unet"
    if '"lightning_sdxl/assets/toy-sdxl"' in code:
        return "toy"
    raise AssertionError(f"a README python block this test does not know; add it here:\n{code}")


KINDS = [kind(code) for code in SNIPPETS]


@pytest.fixture(scope="module")
def export(tiny_sdxl_path, tmp_path_factory) -> Path:
    """The export of a tiny 8to4 LoRA student (4 steps, as the snippets' default run)."""
    root = tmp_path_factory.mktemp("readme")
    module = build_perturbed_module(tiny_sdxl_path, root / "run")
    assert module.stage.student_steps == 4
    return export_student(module, root / "export")


@pytest.fixture(scope="module")
def run_block(export, tiny_sdxl_path):
    """Runs README block `index` once (placeholders substituted) and returns its namespace."""
    done: dict[int, dict] = {}

    def run(index: int) -> dict:
        if index not in done:
            code = BASE_LINE.sub(f"base = {tiny_sdxl_path!r}", SNIPPETS[index])
            code = code.replace('"export/', f'"{export}/')
            namespace: dict = {"__name__": "__readme__"}
            cwd = os.getcwd()
            os.chdir(REPO)
            try:
                exec(compile(code, f"README.md block {index}", "exec"), namespace)  # noqa: S102
            finally:
                os.chdir(cwd)
            done[index] = namespace
        return done[index]

    return run


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def snippet_call(pipe) -> Image.Image:
    """The export blocks' own call (prompt, steps, guidance, seed), for variants of their pipes."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        "a photo of a cat", num_inference_steps=4, guidance_scale=0, generator=torch.manual_seed(0)
    ).images[0]


def test_the_readme_blocks_are_the_ones_checked_here():
    assert sorted(KINDS) == ["lora", "tcd", "toy", "unet"]


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=KINDS)
def test_block_runs_as_written_and_makes_an_image(index, run_block):
    image = run_block(index)["image"]
    assert isinstance(image, Image.Image)
    # the toy teacher draws 32 px; the tiny SDXL's default size is 16 latents x 8 = 128 px
    assert image.size == ((32, 32) if KINDS[index] == "toy" else (128, 128))
    assert pixels(image).std() > 1.0, "a flat image"


def test_lora_block_gives_the_merged_unet_blocks_image(run_block, export):
    merged_ns, lora_ns = (run_block(KINDS.index(k)) for k in ("unet", "lora"))
    merged, lora = pixels(merged_ns["image"]), pixels(lora_ns["image"])
    # unfused LoRA vs merged weights: float32 rounding, at most a level of 8-bit colour
    assert np.abs(merged - lora).max() <= 1.0, np.abs(merged - lora).max()

    # ... and the LoRA counts, once: the base alone, or the LoRA on top of the merged UNet (the
    # update twice), give other images
    merged_ns["pipe"].load_lora_weights(export / LORA_FILE)
    twice = pixels(snippet_call(merged_ns["pipe"]))
    lora_ns["pipe"].unload_lora_weights()
    base = pixels(snippet_call(lora_ns["pipe"]))
    assert np.abs(twice - merged).max() > 10.0, np.abs(twice - merged).max()
    assert np.abs(base - merged).max() > 10.0, np.abs(base - merged).max()
