"""An installed (non-editable) package carries conf/: the recipe composes its phases from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_recipe_composes_from_an_installed_wheel(tmp_path):
    # Built from a copy: setuptools writes its build/ folder into the source tree.
    source = tmp_path / "source"
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "outputs", "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    build = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)]
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    wheel = next(tmp_path.glob("lightning_sdxl-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = [path.relative_to(REPO / "conf").as_posix() for path in (REPO / "conf").rglob("*.yaml")]
    assert configs and not [c for c in configs if f"lightning_sdxl/conf/{c}" not in names]
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)]
    subprocess.run(install, check=True, capture_output=True, timeout=600)
    code = (
        "import lightning_sdxl; from lightning_sdxl.recipe import recipe_phases; from lightning_sdxl.run_config import compose_train_config\n"
        "cfg = compose_train_config(['experiment=toy_recipe'])\n"
        "print(lightning_sdxl.__file__, len(recipe_phases(cfg.recipe)), cfg.model.path)"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    package, phases, model_path = result.stdout.split()
    assert package.startswith(str(site)) and model_path.startswith(str(site))  # not the checkout
    assert int(phases) > 10
    # ... and runs: the recipe's 1-step stage (x0 conversion, phases a, b, c) from outside the checkout.
    run_dir = tmp_path / "recipe_run"
    command = [
        sys.executable, "-m", "lightning_sdxl.recipe", "experiment=toy_recipe", "recipe.first_stage=null",
        "recipe.stages=[2to1]", "model=tiny", "data.resolution=64", "data.batch_size=2", "student.lora_rank=4",
        "validation.num_prompts=2", "steps=1", "validation.every_n_steps=1", "checkpoint.every_n_steps=1",
        "trainer=cpu", "trainer.enable_progress_bar=false", "logger=none", f"hydra.run.dir={run_dir}",
    ]
    env["LIGHTNING_SDXL_HOME"] = str(tmp_path / "home")
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    releases = json.loads((run_dir / "releases.json").read_text())
    assert list(releases) == ["1step"] and Path(releases["1step"]["unet"]).is_dir()
