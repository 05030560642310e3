"""FID-Whole, FID-Patch and CLIP score as validation callbacks on the tiny model (CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_metrics import TINY_CLIP, TinyFeatureNet, save_tiny_net, tiny_clip  # noqa: F401 (fixture)
from test_train import read_metrics

from lightning_sdxl.callbacks.metrics import DistillationMetrics
from lightning_sdxl.metrics import (
    CLIPScore,
    FIDPatch,
    FIDWhole,
    LocalFeatures,
    MissingMetricWeights,
    OpenCLIPScorer,
)
from lightning_sdxl.train import train


def make_metrics(weights: str, clip, cache_dir: Path) -> DistillationMetrics:
    _, config_path, clip_weights = clip
    return DistillationMetrics(
        fid_whole=FIDWhole(LocalFeatures(TinyFeatureNet(), weights, input_size=32)),
        fid_patch=FIDPatch(LocalFeatures(TinyFeatureNet(), weights, input_size=32)),
        clip_score=CLIPScore(OpenCLIPScorer(TINY_CLIP, clip_weights, model_config=config_path)),
        cache_dir=str(cache_dir),
    )


def test_validation_logs_all_three_metrics_and_caches_references(make_config, tiny_clip, tmp_path):  # noqa: F811
    weights = save_tiny_net(tmp_path / "features.safetensors", seed=0)
    metrics = make_metrics(weights, tiny_clip, tmp_path / "stats")
    cfg = make_config("validation.num_prompts=4", "steps=2")
    train(cfg, extra_callbacks=[metrics])
    rows = read_metrics(Path(cfg.output_dir))
    logged = {key: float(row[key]) for row in rows for key in ("val/fid_whole", "val/fid_patch", "val/clip_score") if row.get(key)}
    assert set(logged) == {"val/fid_whole", "val/fid_patch", "val/clip_score"}
    assert all(math.isfinite(value) for value in logged.values())
    assert logged["val/fid_whole"] > 0 and logged["val/clip_score"] >= 0
    # One cached statistics file per FID view, reused by a second run (no extractor call).
    assert len(list((tmp_path / "stats").glob("*.safetensors"))) == 2
    again = make_metrics(weights, tiny_clip, tmp_path / "stats")
    calls = []
    for fid in again.fids.values():
        fid.extractor.register_forward_hook(lambda *args: calls.append(1))
    train(make_config("validation.num_prompts=4", "steps=2"), extra_callbacks=[again])
    batches = math.ceil(4 / cfg.data.batch_size)
    assert len(calls) == 2 * batches  # generated images only (no reference pass): each view, each batch

def test_missing_metric_weights_fail_before_any_model_loads(make_config, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    from lightning_sdxl import module

    monkeypatch.setattr(module, "load_sdxl", lambda *a, **k: pytest.fail("the model loaded before the metrics check"))
    with pytest.raises(MissingMetricWeights, match="weights_path"):
        train(make_config("callbacks=metrics", "metrics=sdxl"))


def test_missing_metric_weights_are_one_line_on_the_command_line(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch")}
    result = subprocess.run(
        [sys.executable, "train.py", "callbacks=metrics", "metrics=sdxl", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("Config error:")]
    assert len(errors) == 1 and "FID Inception weights not found" in errors[0]
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # 43 s: two processes (pytest -m slow, which CI runs)
def test_metrics_callback_under_ddp_two_cpu_processes(tmp_path, tiny_clip):  # noqa: F811
    """callbacks=metrics through the CLI with 2 gloo processes: each rank scores its shard, the
    states are synchronised, and the logged values are finite."""
    import os
    import subprocess
    import sys

    from conftest import CPU_OVERRIDES
    from test_eval import metric_overrides

    features = save_tiny_net(tmp_path / "features.safetensors", seed=0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "train.py", *CPU_OVERRIDES, "callbacks=metrics", "metrics=sdxl", "validation.num_prompts=4",
         "trainer.devices=2", "trainer.accelerator=cpu", f"metrics.cache_dir={tmp_path / 'stats'}",
         *metric_overrides(features, tiny_clip), f"hydra.run.dir={run}"],
        cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    logged = {key: float(row[key]) for row in read_metrics(run) for key in ("val/fid_whole", "val/fid_patch", "val/clip_score") if row.get(key)}
    assert set(logged) == {"val/fid_whole", "val/fid_patch", "val/clip_score"}
    assert all(math.isfinite(value) for value in logged.values())


def test_patch_larger_than_the_images_fails_before_training(make_config, tiny_clip, tmp_path):  # noqa: F811
    from lightning_sdxl.errors import ConfigError

    weights = save_tiny_net(tmp_path / "features.safetensors", seed=0)
    metrics = make_metrics(weights, tiny_clip, tmp_path / "stats")
    metrics.fids["fid_patch"] = FIDPatch(LocalFeatures(TinyFeatureNet(), weights, input_size=128))
    with pytest.raises(ConfigError, match="128 px native crop, but data.resolution=64"):
        train(make_config(), extra_callbacks=[metrics])
