"""The open toy world's committed metric networks (lightning_sdxl/assets/toy-metrics-open,
conf/metrics/toy_open.yaml): they compose into the run configs, load through the metric code and
see what a blurry one-step student gets wrong: FID-Whole and FID-Patch grow when images blur (or
their textures average over phases, as a regression onto many sharp outcomes does), the crop
heads read texture on the FID-Patch view, and CLIP score rewards the right colour and texture."""

from __future__ import annotations

import dataclasses

import hydra
import numpy as np
import pytest
import torch
from conftest import CONF_DIR, compose_config
from hydra import compose, initialize_config_dir
from torchvision.transforms.functional import gaussian_blur

from lightning_sdxl.data.toy_world import TEXTURE_WORDS, WORLDS, ToyWorld, render_scene
from lightning_sdxl.metrics import FIDPatch, FIDWhole, LocalFeatures, OpenCLIPScorer
from lightning_sdxl.toy import clip, feature_net
from lightning_sdxl.toy.feature_net import ToyFeatureNet, held_out_report

NUM_IMAGES = 256  # per FID set: above the 128 feature dimensions


def open_world_images(seed: int, num_images: int = NUM_IMAGES) -> torch.Tensor:
    world = ToyWorld(32, seed=seed, world="open")
    return torch.stack([world[i]["pixel_values"] for i in range(num_images)]) / 2 + 0.5  # (N, 3, 32, 32)


def phase_averaged(seed: int, outcomes: int, num_images: int = NUM_IMAGES) -> torch.Tensor:
    """Each scene's texture averaged over `outcomes` random phases, shape kept: what a regression
    onto a caption's many sharp textures draws (a kind of blur the network never trained on)."""
    world, rng = ToyWorld(32, seed=seed, world="open"), np.random.default_rng(5)
    images = []
    for i in range(num_images):
        scene = world.scene(i)
        renders = [
            np.asarray(render_scene(dataclasses.replace(scene, phase=tuple(rng.uniform(0, 1, 2))), 32), np.float32)
            for _ in range(outcomes)
        ]
        images.append(torch.from_numpy(np.mean(renders, axis=0)).permute(2, 0, 1) / 255)
    return torch.stack(images)


@pytest.fixture(scope="module")
def metrics():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["metrics=toy_open"])
    return {name: hydra.utils.instantiate(cfg.metrics[name]) for name in ("fid_whole", "fid_patch", "clip_score")}


def fid(metric, real: torch.Tensor, fake: torch.Tensor) -> float:
    """A fresh FID of `metric`'s kind and network between two image sets."""
    fresh = type(metric)(metric.extractor)
    fresh.update(real, real=True)
    fresh.update(fake.clamp(0, 1), real=False)
    return float(fresh.compute())


def test_toy_open_composes_into_training_and_eval_configs(metrics):
    cfg = compose_config(["metrics=toy_open", "callbacks=metrics"])  # python train.py ... callbacks=metrics
    assert cfg.metrics.fid_whole.extractor.network.world == "open"
    weights = cfg.callbacks.metrics.fid_patch.extractor.weights_path
    assert weights.endswith("toy-metrics-open/toy_features.safetensors")
    names = ("fid_whole", "fid_patch", "clip_score")
    built = {name: hydra.utils.instantiate(cfg.callbacks.metrics[name]) for name in names}
    assert isinstance(built["fid_whole"], FIDWhole) and isinstance(built["fid_patch"], FIDPatch)
    assert built["fid_patch"].extractor.input_size == 16
    network = metrics["fid_whole"].extractor.network
    assert isinstance(network, ToyFeatureNet) and set(network.crop_heads) == {"texture", "phase", "blur"}
    # Its own reference-statistics cache key: not the simple world's network.
    simple = hydra.utils.instantiate(compose_config(["metrics=toy"]).metrics.fid_whole)
    assert metrics["fid_whole"].extractor.identity != simple.extractor.identity


def test_open_feature_net_reads_every_head_on_held_out_images(metrics):
    report = held_out_report(metrics["fid_whole"].extractor.network, ToyWorld(32, seed=7, world="open"), 256)
    # Measured (seed 7, 256 images): every accuracy 1.0, phase errors ~0.01 period, blur ~0.06 px.
    accuracies = {k: v for k, v in report.items() if not k.endswith("_error")}
    assert min(accuracies.values()) > 0.95, report  # chance: 1/3 (texture, kind), 1/4 (colour, quadrant)
    assert report["crop/phase_error"] < 0.05 and report["whole/phase_error"] < 0.05, report  # chance 0.25
    assert report["crop/blur_error"] < 0.2 and report["whole/blur_error"] < 0.2, report  # sigma in 0..1.5 px


def test_open_fids_see_blur(metrics):
    """FID between two sharp held-out sets vs between sharp images and blurred others."""
    sharp, others = open_world_images(1), open_world_images(2)
    views = {
        "sharp": others,
        "gaussian": gaussian_blur(others, [5, 5], [1.0, 1.0]),
        "phase_average": phase_averaged(2, outcomes=8),
    }
    values = {
        (kind, view): fid(metrics[kind], sharp, images)
        for kind in ("fid_whole", "fid_patch") for view, images in views.items()
    }
    # Measured: whole 1.7 / 9.2 / 19.7, patch 2.0 / 18.0 / 44.2 (sharp / gaussian sigma 1 / 8-phase average).
    for kind in ("fid_whole", "fid_patch"):
        floor = values[kind, "sharp"]
        assert values[kind, "gaussian"] > 3 * floor and values[kind, "phase_average"] > 5 * floor, values


def test_open_clip_scores_right_captions_above_shuffled(metrics):
    world = ToyWorld(32, seed=7, world="open")
    scenes = [world.scene(i) for i in range(48)]
    images = open_world_images(7, 48)
    captions = [s.caption for s in scenes]
    # Shuffled: each image gets the next caption that differs from its own.
    shuffled = [next(c for c in captions[i + 1 :] + captions[:i] if c != captions[i]) for i in range(48)]
    # One word wrong: the next colour with the right texture, the right colour with the next texture.
    colours, textures = WORLDS["open"].colours, WORLDS["open"].backgrounds

    def caption(colour: str, texture: str) -> str:
        return f"a {colour} shape on a {TEXTURE_WORDS[texture]} background"

    assert captions[0] == caption(scenes[0].shapes[0].colour, scenes[0].background)
    wrong_colour = [caption(colours[(colours.index(s.shapes[0].colour) + 1) % 4], s.background) for s in scenes]
    wrong_texture = [caption(s.shapes[0].colour, textures[(textures.index(s.background) + 1) % 3]) for s in scenes]
    scorer = metrics["clip_score"].scorer
    matched = scorer(images, captions)
    # Measured (seed 7, 48 images): matched 95.2; shuffled -3.8, wrong colour 23.7, wrong texture
    # 41.1; every image prefers its own caption in each.
    for wrong in (shuffled, wrong_colour, wrong_texture):
        scores = scorer(images, wrong)
        assert matched.mean() > scores.mean() + 30, (matched.mean(), scores.mean())
        assert (matched > scores).float().mean() > 0.9, (matched, scores)


def test_open_regenerate_commands_run_at_a_few_steps(tmp_path):
    features, weights = tmp_path / "features.safetensors", tmp_path / "clip.safetensors"
    feature_net.main(["--world", "open", "--out", str(features), "--steps", "2"])
    clip.main(["--world", "open", "--out", str(weights), "--steps", "2"])
    LocalFeatures(ToyFeatureNet(world="open"), features, input_size=16)
    OpenCLIPScorer(clip.MODEL_NAME, str(weights), tmp_path / "toy-clip.json")
