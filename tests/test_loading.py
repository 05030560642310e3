"""One loading path: the tiny SDXL folder, real-SDXL folder layouts, prompt encoding."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from open_clip.tokenizer import SimpleTokenizer

from lightning_sdxl.models.loading import check_pipeline_folder, load_sdxl
from lightning_sdxl.models.text_encoding import SDXLTextEncoder
from lightning_sdxl.models.tiny import build_tiny_sdxl, ensure_tiny_sdxl
from lightning_sdxl.models.tokenizers import offline_clip_tokenizer

PROMPTS = ["a small green cross at the bottom right on a striped background", ""]


def test_tiny_sdxl_is_deterministic_in_its_seed():
    first, again, other = (build_tiny_sdxl(seed).unet.state_dict() for seed in (0, 0, 1))
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_tiny_folder_is_a_standard_sdxl_folder(tiny_sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    components = load_sdxl(tiny_sdxl_path)
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.state_dict().values(), components.unet.state_dict().values()))
    assert components.unet.config.addition_embed_type == "text_time"
    assert components.scheduler_config["beta_schedule"] == "scaled_linear"
    assert len(components.tokenizer) == 49408 and components.tokenizer_2.pad_token == "!"


def test_prompt_encoding_equals_the_pipeline(tiny_sdxl_path):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    components = load_sdxl(tiny_sdxl_path)
    encoder = SDXLTextEncoder(
        components.text_encoder, components.text_encoder_2, components.tokenizer, components.tokenizer_2,
        zero_empty_prompt=components.force_zeros_for_empty_prompt,
    )
    prompt_embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
    ours, ours_pooled = encoder.encode(PROMPTS)
    assert torch.allclose(ours, prompt_embeds) and torch.allclose(ours_pooled, pooled)
    uncond, uncond_pooled = encoder.encode_unconditional(2)
    assert torch.equal(uncond, negative) and torch.equal(uncond_pooled, negative_pooled)


def test_real_sdxl_layout_classic_tokenizer_files_and_fp16_variant(tiny_sdxl_path, tmp_path):
    """Hub SDXL folders ship vocab.json + merges.txt tokenizers and *.fp16.safetensors variants."""
    folder = tmp_path / "sdxl"
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.to(torch.float16).save_pretrained(folder, variant="fp16")
    vocab = offline_clip_tokenizer().get_vocab()
    bpe = SimpleTokenizer()
    merges = "\n".join(" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1]))
    for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!")):
        shutil.rmtree(folder / name)
        (folder / name).mkdir()
        (folder / name / "vocab.json").write_text(json.dumps(vocab))
        (folder / name / "merges.txt").write_text("#version: 0.2\n" + merges + "\n")
        (folder / name / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad,
             "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
        ))
    components = load_sdxl(str(folder), variant="fp16", dtype=torch.float16)
    assert components.unet.dtype == torch.float16
    ids = components.tokenizer_2(PROMPTS[0], padding="max_length", max_length=77).input_ids
    assert ids == pipe.tokenizer_2(PROMPTS[0], padding="max_length", max_length=77).input_ids
    assert ids[-1] == 0  # tokenizer 2 pads with "!"


def test_incomplete_folder_is_a_clear_error(tiny_sdxl_path, tmp_path):
    shutil.copytree(tiny_sdxl_path, tmp_path / "broken")
    shutil.rmtree(tmp_path / "broken" / "vae")
    with pytest.raises(FileNotFoundError, match="missing: vae"):
        check_pipeline_folder(str(tmp_path / "broken"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_pipeline_folder(str(tmp_path / "nowhere"))
    # A hub id is not checked as a folder; offline and not cached it is a clear error at once.
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        check_pipeline_folder("stabilityai/stable-diffusion-xl-base-1.0")


def test_ensure_tiny_sdxl_writes_once(tmp_path):
    folder = ensure_tiny_sdxl(tmp_path / "tiny", seed=3)
    stamp = (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_sdxl(tmp_path / "tiny", seed=3) == folder
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "staging folder left behind"
