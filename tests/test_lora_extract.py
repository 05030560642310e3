"""A LoRA for the base model extracted from a distilled full UNet (lightning_sdxl/lora_extract.py)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from lightning_sdxl.export import INFO_FILE, KOHYA_FILE, LORA_FILE
from lightning_sdxl.lora_extract import extract_lora, target_layers

REPO = Path(__file__).resolve().parents[1]


def unet_output(unet: UNet2DConditionModel) -> torch.Tensor:
    """One forward on fixed inputs (the tiny UNet's cross-attention and text_time sizes)."""
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    hidden = torch.randn(2, 7, config.cross_attention_dim, generator=generator)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(2, pooled, generator=generator), "time_ids": torch.rand(2, 6, generator=generator) * 64}
    with torch.no_grad():
        return unet(sample, torch.tensor([999, 499]), hidden, added_cond_kwargs=added).sample


@pytest.fixture(scope="module")
def base_and_tuned(tiny_sdxl_path):
    """The tiny base UNet and a "distilled" copy: a rank-2 change on every LoRA target layer."""
    base = UNet2DConditionModel.from_pretrained(tiny_sdxl_path, subfolder="unet")
    tuned = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in target_layers(tuned).values():
            out_features = layer.weight.shape[0]
            rest = layer.weight[0].numel()
            change = torch.randn(out_features, 2, generator=generator) @ torch.randn(2, rest, generator=generator)
            layer.weight.add_(0.02 * change.reshape(layer.weight.shape))
    return base, tuned


def test_extracted_lora_on_the_base_reproduces_the_tuned_unet(base_and_tuned, tiny_sdxl_path, tmp_path):
    base, tuned = base_and_tuned
    adapted, info = extract_lora(base, tuned, rank=4)
    assert info["relative_error"] < 1e-5 and info["uncaptured_fraction"] < 1e-9, info
    expected = unet_output(tuned)
    assert (expected - unet_output(base)).abs().max() > 1e-2  # the change is visible
    assert torch.allclose(unet_output(adapted), expected, atol=1e-4)

    # The CLI's files load onto the stock base pipeline, diffusers and kohya alike.
    tuned.save_pretrained(tmp_path / "tuned")
    out = tmp_path / "lora"
    result = subprocess.run(
        [sys.executable, "-m", "lightning_sdxl.lora_extract", "--base", tiny_sdxl_path, "--unet",
         str(tmp_path / "tuned"), "--rank", "4", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / INFO_FILE).read_text())["layers"] == len(target_layers(base))
    for weight_name in (LORA_FILE, KOHYA_FILE):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
        pipe.load_lora_weights(out, weight_name=weight_name)
        loaded = unet_output(pipe.unet)
        assert torch.allclose(loaded, expected, atol=1e-4), (weight_name, (loaded - expected).abs().max())


def test_truncation_and_changes_outside_the_lora_are_reported(base_and_tuned):
    base, tuned = base_and_tuned
    _, info = extract_lora(base, tuned, rank=1)  # the change has rank 2
    assert 0.1 < info["relative_error"] < 1.0, info

    shifted = copy.deepcopy(tuned)
    with torch.no_grad():
        shifted.conv_in.bias.add_(0.5)  # no LoRA target holds conv_in or a bias
    _, info = extract_lora(base, shifted, rank=4)
    assert info["uncaptured_fraction"] > 1e-3 and "conv_in.bias" in info["uncaptured_tensors"], info


def test_unrelated_unets_are_refused(base_and_tuned):
    base, _ = base_and_tuned
    other = copy.deepcopy(base)
    other.conv_out = torch.nn.Conv2d(base.conv_out.in_channels, 4, 1)
    with pytest.raises(ValueError, match="not a fine-tune"):
        extract_lora(base, other, rank=4)
