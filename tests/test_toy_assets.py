"""The committed toy assets: the teacher loads offline in stock diffusers and follows its captions,
the metric networks load through the metric code and measure what they should, and every asset's
regenerate command runs (at a few steps)."""

from __future__ import annotations

import hydra
import pytest
import torch
from conftest import CONF_DIR, compose_config
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
from hydra import compose, initialize_config_dir
from safetensors import safe_open

from lightning_sdxl import ASSETS_DIR
from lightning_sdxl.data.toy_world import ToyWorld
from lightning_sdxl.toy import build_teacher, clip, feature_net
from lightning_sdxl.toy.feature_net import ToyFeatureNet, attribute_accuracy

TEACHER = ASSETS_DIR / "toy-sdxl"


def toy_metrics():
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("eval", overrides=["metrics=toy"])
    return {name: hydra.utils.instantiate(cfg.metrics[name]) for name in ("fid_whole", "fid_patch", "clip_score")}


@pytest.fixture(scope="module")
def teacher_pipeline() -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(TEACHER, use_safetensors=True, torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_default_run_distils_the_committed_teacher():
    cfg = compose_config(shrink=False)
    assert cfg.model.name == "toy" and cfg.model.path == str(TEACHER)
    assert cfg.data.resolution == 32 and cfg.data.world == "simple"
    assert (TEACHER / "model_index.json").exists()


def test_committed_teacher_samples_in_stock_diffusers_offline(teacher_pipeline):
    prompt = ToyWorld(32, world="simple").scene(0).caption
    images = teacher_pipeline(
        prompt, num_inference_steps=4, guidance_scale=5.0, height=32, width=32, output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert teacher_pipeline.unet.dtype == torch.float32 and teacher_pipeline.vae.config.block_out_channels == [32, 64, 64]


def test_committed_teacher_draws_what_its_captions_say(teacher_pipeline):
    """32-step guided samples of held-out captions, read back by the committed attribute classifier:
    colour, shape and background well above chance (1/4, 1/3, 1/3)."""
    world = ToyWorld(32, seed=123, world="simple")
    scenes = [world.scene(i) for i in range(24)]
    images = teacher_pipeline(
        [s.caption for s in scenes], num_inference_steps=32, guidance_scale=6.0, height=32, width=32,
        output_type="pt", generator=[torch.Generator().manual_seed(i) for i in range(len(scenes))],
    ).images
    network = toy_metrics()["fid_whole"].extractor.network
    logits = network.classify(images)
    words = feature_net._attribute_words("simple")
    truth = {
        "colour": [words["colour"].index(s.shapes[0].colour) for s in scenes],
        "kind": [words["kind"].index(s.shapes[0].kind) for s in scenes],
        "background": [words["background"].index(s.background) for s in scenes],
    }
    accuracy = {k: (logits[k].argmax(1) == torch.tensor(v)).float().mean().item() for k, v in truth.items()}
    assert accuracy["colour"] > 0.6 and accuracy["kind"] > 0.5 and accuracy["background"] > 0.6, accuracy


def test_committed_metric_networks_load_and_measure():
    metrics = toy_metrics()
    network = metrics["fid_whole"].extractor.network
    assert isinstance(network, ToyFeatureNet) and metrics["fid_patch"].extractor.input_size == 16
    held_out = attribute_accuracy(network, ToyWorld(32, seed=7, world="simple"), num_images=128)
    assert min(held_out.values()) > 0.9, held_out
    # CLIP score: real images score higher with their own captions than with shuffled ones.
    world = ToyWorld(32, seed=7, world="simple")
    images = torch.stack([world[i]["pixel_values"] for i in range(32)]) / 2 + 0.5
    captions = [world.scene(i).caption for i in range(32)]
    scorer = metrics["clip_score"].scorer
    matched = scorer(images, captions).mean()
    shuffled = scorer(images, captions[1:] + captions[:1]).mean()
    assert matched > shuffled + 5, (matched, shuffled)


@pytest.mark.slow  # 21 s (pytest -m slow, which CI runs)
def test_regenerate_commands_run_at_a_few_steps(tmp_path):
    out = build_teacher.main([
        "--out", str(tmp_path / "teacher"), "--work-dir", str(tmp_path / "work"), "--vae-steps", "2",
        "--steps", "2", "validation.every_n_steps=2", "checkpoint.every_n_steps=2", "data.batch_size=4",
        "trainer.enable_progress_bar=false", "logger=csv",
    ])
    with safe_open(str(out / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as weights:
        name = next(iter(weights.keys()))
        assert weights.get_tensor(name).dtype == torch.float16  # float16: the committed folder stays small
    # ... but loaded as float32 with from_pretrained's defaults (diffusers: float32; transformers: the
    # config's dtype), so the folder samples as the README types it.
    pipe = StableDiffusionXLPipeline.from_pretrained(out, use_safetensors=True)
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.float32}
    assert (tmp_path / "work" / "teacher" / "samples").is_dir()

    feature_net.main(["--out", str(tmp_path / "features.safetensors"), "--steps", "2"])
    clip.main(["--out", str(tmp_path / "clip.safetensors"), "--steps", "2"])
    from lightning_sdxl.metrics import LocalFeatures, OpenCLIPScorer

    LocalFeatures(ToyFeatureNet(), tmp_path / "features.safetensors", input_size=32)
    OpenCLIPScorer(clip.MODEL_NAME, str(tmp_path / "clip.safetensors"), tmp_path / "toy-clip.json")


def test_open_world_teacher_loads_in_stock_diffusers_and_its_single_file_loads_every_weight(tmp_path):
    """The open world's teacher: float32 with from_pretrained's defaults, and text encoders of unequal
    widths (32, 48), so diffusers' single-file reader fills text_encoder_2 from the file itself."""
    from lightning_sdxl import ASSETS_DIR
    from lightning_sdxl.single_file import save_components

    folder = ASSETS_DIR / "toy-sdxl-open"
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    assert {pipe.unet.dtype, pipe.text_encoder.dtype, pipe.text_encoder_2.dtype} == {torch.float32}
    assert (pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size) == (32, 48)
    single = tmp_path / "open.safetensors"
    save_components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2, single, torch.float32)
    loaded = StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder), torch_dtype=torch.float32)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        own, read = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert not [k for k, v in read.items() if v.is_meta], name
        assert all(torch.equal(own[k], read[k]) for k in own), name


@pytest.mark.slow
def test_the_default_2to1_adversarial_run_ends_with_a_discriminator_signal(tmp_path):
    """Issue 10's check, as the README gives it: `python train.py stage=2to1 loss=uncond_adv` on the
    toy defaults (the full 400 batches) ends with D outside the no-signal band over its last fifth.
    Measured 0.61 for seed 0 at one thread (docs/MEASUREMENTS.md); 0.55 is the band's edge."""
    import json

    from lightning_sdxl.train import train

    cfg = compose_config(["stage=2to1", "loss=uncond_adv", "logger=csv", "callbacks.export.single_file=false"],
                         tmp_path / "run", shrink=False)
    train(cfg)
    signal = json.loads((tmp_path / "run" / "export" / "export_info.json").read_text())["discriminator"]
    assert not signal["no_signal"] and signal["accuracy_last_fifth"] > 0.55, signal
    assert signal["accuracy_by_start"]["999"] > 0.55, signal
