"""eval.py end to end on the toy world with the tiny model and tiny metric networks (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from test_metrics import TINY_CLIP, save_tiny_net, tiny_clip  # noqa: F401 (fixture)

import lightning_sdxl.evaluate as evaluate_module
from lightning_sdxl.errors import ConfigError, MissingPathError
from lightning_sdxl.evaluate import evaluate
from lightning_sdxl.train import train

REPO = Path(__file__).resolve().parents[1]


def metric_overrides(features: str, clip) -> list[str]:
    """Tiny local networks in place of Inception and ViT-g-14, through the same metric classes."""
    _, config_path, clip_weights = clip
    overrides = []
    for name in ("fid_whole", "fid_patch"):
        overrides += [
            f"metrics.{name}.extractor._target_=lightning_sdxl.metrics.LocalFeatures",
            f"metrics.{name}.extractor.weights_path={features}",
            f"+metrics.{name}.extractor.network._target_=test_metrics.TinyFeatureNet",
            f"+metrics.{name}.extractor.input_size=32",
        ]
    return overrides + [
        f"metrics.clip_score.scorer.model_name={TINY_CLIP}",
        f"metrics.clip_score.scorer.pretrained={clip_weights}",
        f"metrics.clip_score.scorer.model_config={config_path}",
    ]


@pytest.fixture
def eval_config(tmp_path, tiny_clip):  # noqa: F811
    features = save_tiny_net(tmp_path / "features.safetensors", seed=0)

    def make(*overrides: str):
        base = ["model=tiny", "metrics=sdxl", "data.resolution=64", "num_images=4", "batch_size=2", f"metrics.cache_dir={tmp_path / 'stats'}"]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("eval", overrides=base + metric_overrides(features, tiny_clip) + list(overrides))
        with open_dict(cfg):
            cfg.output_dir = str(tmp_path / "eval")
        return cfg

    make.features = features
    return make


def test_teacher_table_grid_images_and_resume(eval_config, tmp_path, capsys):
    rows = evaluate(eval_config("target.kind=teacher", "steps=[1,2]"))
    printed = capsys.readouterr().out  # the table reaches the terminal, not only results.md
    assert "| model | steps | FID-Whole" in printed and "results.md" in printed
    out = tmp_path / "eval"
    assert [(row["model"], row["steps"]) for row in rows] == [("teacher", 1), ("teacher", 2)]
    assert json.loads((out / "results.json").read_text()) == rows
    table = (out / "results.md").read_text().splitlines()
    assert table[0] == "| model | steps | FID-Whole | FID-Patch | CLIP | precision | recall |" and len(table) == 4
    assert (out / "results.csv").read_text().startswith("model,steps,fid_whole,fid_patch,clip_score,precision,recall")
    assert (out / "grid.png").exists() and len(list((out / "images" / "steps_2").glob("*.png"))) == 4
    assert all(row["fid_whole"] > 0 and row["clip_score"] >= 0 for row in rows)
    # Precision and recall (k = 3 of 4 images) on the FID-Whole view: shares, in [0, 1].
    assert all(0.0 <= row[key] <= 1.0 for row in rows for key in ("precision", "recall"))

    # A rerun after a crash regenerates only the missing image and gives the same table.
    images = sorted((out / "images" / "steps_1").glob("*.png"))
    images[0].unlink()
    stamps = {path: path.stat().st_mtime_ns for path in images[1:]}
    rerun = evaluate(eval_config("target.kind=teacher", "steps=[1,2]"))
    for before, after in zip(rows, rerun):  # float summation order differs with cached references
        assert (after["model"], after["steps"]) == (before["model"], before["steps"])
        for metric in ("fid_whole", "fid_patch", "clip_score", "precision", "recall"):
            assert after[metric] == pytest.approx(before[metric], rel=1e-5)
    assert images[0].exists() and all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())


def test_checkpoint_export_and_lora_give_the_same_scores(eval_config, make_config, tmp_path, monkeypatch):
    cfg = make_config("student.lr=1e-2", "steps=2")
    train(cfg)
    run = Path(cfg.output_dir)
    scores = {}
    for kind, path in (
        ("checkpoint", run / "checkpoints" / "last.ckpt"),
        ("unet", run / "export" / "unet"),
        ("lora", run / "export" / "lora.safetensors"),
    ):
        (rows,) = evaluate(eval_config(f"target.kind={kind}", f"target.path={path}", "steps=[4]"))
        scores[kind] = rows  # one output folder: images are reused only for the same weights (images_key.json)
    teacher = evaluate(eval_config("target.kind=teacher", "steps=[4]"))[0]
    # The default target (kind=latest) is the newest run's export: this one.
    monkeypatch.setattr(evaluate_module, "RUNS_DIR", tmp_path)
    (latest,) = evaluate(eval_config("steps=[4]"))
    assert latest["model"] == "unet:run" and latest["fid_whole"] == pytest.approx(scores["unet"]["fid_whole"], rel=1e-6)
    with pytest.raises(MissingPathError, match="no finished training run under .*run `python train.py` first"):
        evaluate_module.latest_export(tmp_path / "eval")
    for kind in ("unet", "lora"):
        for metric in ("fid_whole", "fid_patch", "clip_score"):
            assert scores[kind][metric] == pytest.approx(scores["checkpoint"][metric], rel=1e-3, abs=1e-3), kind
    # The teacher's scores come from its own images, not the student's cached in the same folder.
    assert scores["checkpoint"]["fid_whole"] != pytest.approx(teacher["fid_whole"], rel=1e-6), "stale images reused?"


def run_eval_cli(args: list[str], flags: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run(
        [sys.executable, "eval.py", *flags, *args], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=300, check=False,
    )


def test_missing_checkpoint_is_a_one_line_error(tmp_path):
    result = run_eval_cli(["target.kind=checkpoint", "target.path=/nonexistent.ckpt", f"hydra.run.dir={tmp_path}"])
    assert result.returncode == 2, result.stderr[-2000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("Config error:")] == [
        "Config error: target.path=/nonexistent.ckpt does not exist: give the checkpoint to evaluate (see conf/eval.yaml)."
    ]


@pytest.mark.slow  # 20 s (pytest -m slow, which CI runs)
def test_multirun_over_steps(tmp_path, tiny_clip):  # noqa: F811
    features = save_tiny_net(tmp_path / "features.safetensors", seed=0)
    args = ["model=tiny", "metrics=sdxl", "data.resolution=64", "num_images=4", "batch_size=2", f"metrics.cache_dir={tmp_path / 'stats'}"]
    result = run_eval_cli(
        [*args, *metric_overrides(features, tiny_clip), "target.kind=teacher", "steps=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        flags=["-m"],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tables = sorted((tmp_path / "sweep").glob("*/results.json"))
    assert [json.loads(t.read_text())[0]["steps"] for t in tables] == [1, 2]
    # The reference statistics were computed once and reused by the second job.
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 2


def test_a_unet_with_nan_weights_is_refused(eval_config, tiny_sdxl_path, tmp_path):
    """Issue 15: eval.py scored a NaN run's UNet without a word."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
    with torch.no_grad():
        next(unet.parameters()).view(-1)[0] = float("nan")
    unet.save_pretrained(tmp_path / "nan_unet")
    with pytest.raises(ConfigError, match="NaN or inf weights: it cannot be evaluated"):
        evaluate(eval_config("target.kind=unet", f"target.path={tmp_path / 'nan_unet'}", "steps=[1]"))
