"""Refactors keep results: each configuration trains a few batches from the same seed and its
trained weights match a fingerprint recorded before issue 12's component configs (commit b038ffe).

A fingerprint holds the checksum of the trained tensors' names and, per group of tensors (the first
four parts of their names), the sums of each tensor's sum, squared norm and dot product with a fixed
random tensor: any change of the maths, the draws or their order moves them far beyond the tolerance.
Record again (only when a change of results is intended and explained in its commit):
    python tests/test_same_results.py
"""

from __future__ import annotations

import json
import sys
import zlib
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # conftest, when run as a script
from conftest import compose_config

FINGERPRINTS = Path(__file__).parent / "data" / "same_results.json"

# name -> overrides of the shrunk CPU config (conftest.CPU_OVERRIDES), 3 batches each.
CASES = {
    "default": [],
    "2to1_uncond_full": ["stage=2to1", "loss=uncond_adv", "student=full"],
    "128to32_mse_cfg": ["stage=128to32", "loss=mse"],
    "x0_conversion": ["stage=x0", "loss=mse", "prediction=sample", "student=full"],
    "tscd_mse_adv": ["stage=tscd", "stage.segments=4", "loss=mse_adv"],
    "tscd_online": ["stage=tscd", "stage.segments=2", "loss=mse", "stage.consistency_target=online"],
    "judged_apart_with_extras": [
        "discriminator.shared_forward=false", "discriminator.conditioning_fakes=true", "discriminator.warmup=1",
        "optim.accumulate_grad_batches=1", "loss.renoise_weights=[5,1,1,1]",
    ],
    # Recorded with stage.warmup_steps=1: the teacher's settings moved from stage/ to module/teacher.yaml.
    "teacher": ["experiment=toy_teacher", "module.lr_scheduler.warmup_steps=1", "data.batch_size=2", "data.resolution=64"],
}
STEPS = ["steps=3", "validation.every_n_steps=3", "checkpoint.every_n_steps=3"]
# In the default suite (the others in pytest -m slow): the default run, and TSCD's EMA with both loss terms.
DEFAULT_SUITE = {"default", "tscd_mse_adv"}
# The recipe's 1-step stage (x0 conversion, phases a, b, c), 2 batches a phase: every phase's weights.
RECIPE = ["experiment=toy_recipe", "recipe.first_stage=null", "recipe.stages=[2to1]", "steps=2",
          "checkpoint.every_n_steps=2", "validation.every_n_steps=2", "logger=none"]


def fingerprint(state_dict: dict[str, torch.Tensor]) -> dict:
    """{"names": [count, crc32 of the sorted names], group: [sum, squared norm, <tensor, fixed noise>]}."""
    names = sorted(name for name, tensor in state_dict.items() if torch.is_floating_point(tensor))
    prints = {"names": [len(names), zlib.crc32("\n".join(names).encode())]}
    for name in names:
        tensor = state_dict[name].detach().double().cpu()
        noise = torch.randn(tensor.shape, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())), dtype=torch.double)
        values = [tensor.sum().item(), tensor.pow(2).sum().item(), (tensor * noise).sum().item()]
        group = prints.setdefault(".".join(name.split(".")[:4]), [0.0, 0.0, 0.0])
        prints[".".join(name.split(".")[:4])] = [a + b for a, b in zip(group, values)]
    return prints


def trained_fingerprint(overrides: list[str], output_dir: Path) -> dict[str, list[float]]:
    from lightning_sdxl.train import train

    cfg = compose_config([*overrides, *STEPS, "logger=none", "~callbacks.export"], output_dir)
    train(cfg)
    checkpoint = torch.load(output_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return fingerprint(checkpoint["state_dict"])


def recipe_fingerprints(output_dir: Path) -> dict[str, dict]:
    from conftest import CPU_OVERRIDES

    from lightning_sdxl.recipe import run_recipe

    run_recipe(compose_config(RECIPE, output_dir), [*CPU_OVERRIDES, *RECIPE])
    checkpoints = sorted(output_dir.glob("*/checkpoints/last.ckpt"))
    return {path.parents[1].name: fingerprint(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
            for path in checkpoints}


def assert_same(measured: dict, recorded: dict) -> None:
    assert measured.pop("names") == recorded.pop("names"), "the trained tensors' names changed (checkpoints would not load)"
    for group, values in recorded.items():
        assert measured[group] == pytest.approx(values, rel=1e-4, abs=1e-6), group


@pytest.mark.parametrize(
    "case", [case if case in DEFAULT_SUITE else pytest.param(case, marks=pytest.mark.slow) for case in sorted(CASES)]
)
def test_training_gives_the_recorded_weights(case, tmp_path):
    recorded = json.loads(FINGERPRINTS.read_text())["cases"][case]
    measured = trained_fingerprint(CASES[case], tmp_path / "run")
    assert_same(measured, recorded)


@pytest.mark.slow
def test_the_recipe_gives_the_recorded_weights_in_every_phase(tmp_path):
    recorded = json.loads(FINGERPRINTS.read_text())["recipe"]
    measured = recipe_fingerprints(tmp_path / "recipe")
    assert sorted(measured) == sorted(recorded)
    for phase in recorded:
        assert_same(measured[phase], recorded[phase])


if __name__ == "__main__":
    import subprocess
    import tempfile

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    cases = {name: trained_fingerprint(overrides, Path(tempfile.mkdtemp()) / "run") for name, overrides in CASES.items()}
    recipe = recipe_fingerprints(Path(tempfile.mkdtemp()) / "recipe")
    FINGERPRINTS.parent.mkdir(exist_ok=True)
    FINGERPRINTS.write_text(json.dumps({"recorded_at": commit, "cases": cases, "recipe": recipe}, indent=1) + "\n")
    print(f"{FINGERPRINTS}: {len(cases)} cases at {commit}")
