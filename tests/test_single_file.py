"""The all-in-one SGM checkpoint (lightning_sdxl.single_file) round-trips through diffusers' reader.

Every tensor of unet, vae, text_encoder and text_encoder_2 must come back bit-exact (the files are
written in float32) from `StableDiffusionXLPipeline.from_single_file(file, config=folder,
local_files_only=True)`: offline, the local folder supplies the component configs.

diffusers' reader tells CLIP-L from OpenCLIP bigG by the hidden width of the checkpoint's
position embedding (768 vs 1280 in SDXL). The tiny and toy models have two 32-wide text encoders,
so the pipeline reader would load text_encoder_2 from CLIP-L's keys: for those folders the test
loads text_encoder_2 with the same reader function (`create_diffusers_clip_model_from_ldm`) on the
file without CLIP-L's keys, and the `wide` folder (text encoders 32 and 48 wide: unequal, as in
SDXL) checks all four components through `from_single_file` itself. No test touches the network:
config= is a local folder, local_files_only=True, and conftest.py sets HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lightning_sdxl import ASSETS_DIR
from lightning_sdxl import single_file as sf

PREFIXES = (sf.UNET_PREFIX, sf.VAE_PREFIX, sf.CLIP_L_PREFIX, sf.OPEN_CLIP_PREFIX)
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


def load_components(folder) -> dict[str, torch.nn.Module]:
    folder = str(folder)
    return {
        "unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", dtype=torch.float32),
        "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", dtype=torch.float32),
        "text_encoder": CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", dtype=torch.float32
        ),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(
            folder, subfolder="text_encoder_2", dtype=torch.float32
        ),
    }


def assert_same_tensors(name: str, expected: torch.nn.Module, actual: torch.nn.Module) -> None:
    want, got = expected.state_dict(), actual.state_dict()
    assert set(got) == set(want), f"{name}: keys differ"
    for key, tensor in want.items():
        assert got[key].device.type != "meta", f"{name}.{key} was not in the file"
        assert got[key].dtype == tensor.dtype and torch.equal(got[key], tensor), (
            f"{name}.{key} differs"
        )


@pytest.fixture(scope="module")
def wide_sdxl_path(tiny_sdxl_path, tmp_path_factory):
    """A tiny SDXL whose text encoders differ in width (32 and 48, projection 40) like SDXL's, with
    another shape: 3 UNet levels of 1 layer, transformer depths (1, 1, 2), a 2-level VAE of 2 layers."""
    folder = tmp_path_factory.mktemp("wide-sdxl")
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        shutil.copytree(f"{tiny_sdxl_path}/{name}", folder / name)
    shutil.copy(f"{tiny_sdxl_path}/model_index.json", folder)
    text = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "hidden_act": "gelu",
        "num_attention_heads": 4,
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        models = {
            "text_encoder": CLIPTextModel(
                CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, **text)
            ),
            "text_encoder_2": CLIPTextModelWithProjection(
                CLIPTextConfig(
                    hidden_size=48,
                    intermediate_size=96,
                    num_hidden_layers=3,
                    projection_dim=40,
                    **text,
                )
            ),
            "unet": UNet2DConditionModel(
                sample_size=8,
                block_out_channels=(32, 32, 64),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                layers_per_block=1,
                transformer_layers_per_block=(1, 1, 2),
                attention_head_dim=(2, 4, 4),
                use_linear_projection=True,
                norm_num_groups=16,
                cross_attention_dim=32 + 48,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                projection_class_embeddings_input_dim=40 + 6 * 8,
            ),
            "vae": AutoencoderKL(
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                block_out_channels=(16, 32),
                layers_per_block=2,
                norm_num_groups=8,
                latent_channels=4,
            ),
        }
    for name, model in models.items():
        # Random init leaves norms at 1 / 0 and zero-initialised convs: make every tensor distinct.
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.01)
        model.save_pretrained(folder / name)
    return str(folder)


FOLDERS = {
    "tiny": lambda request: request.getfixturevalue("tiny_sdxl_path"),
    "toy": lambda request: str(ASSETS_DIR / "toy-sdxl"),  # VAE downsamples by 4, fp16 weights
    "wide": lambda request: request.getfixturevalue("wide_sdxl_path"),
}


@pytest.mark.parametrize("which", list(FOLDERS))
def test_round_trip_through_diffusers_reader(which, request, tmp_path):
    folder = FOLDERS[which](request)
    original = load_components(folder)
    out = sf.save_single_file(folder, tmp_path / "model.safetensors", dtype=torch.float32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temp file left

    same_width = (
        original["text_encoder"].config.hidden_size == original["text_encoder_2"].config.hidden_size
    )
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(out),
        config=folder,
        local_files_only=True,
        dtype=torch.float32,
        # see the module docstring: with equal widths the pipeline would misread text_encoder_2
        **({"text_encoder_2": None} if same_width else {}),
    )
    if same_width:
        checkpoint = {k: v for k, v in load_file(out).items() if not k.startswith(sf.CLIP_L_PREFIX)}
        pipe.text_encoder_2 = create_diffusers_clip_model_from_ldm(
            CLIPTextModelWithProjection,
            checkpoint,
            config=folder,
            subfolder="text_encoder_2",
            torch_dtype=torch.float32,
            local_files_only=True,
        )
    for name in COMPONENTS:
        assert_same_tensors(name, original[name], getattr(pipe, name))


def test_cli_writes_the_sgm_layout_in_float16(tiny_sdxl_path, tmp_path):
    out = tmp_path / "sdxl.safetensors"
    sf.main(["--pipeline", tiny_sdxl_path, "--out", str(out)])
    with safe_open(out, "pt") as f:
        keys = set(f.keys())
        shapes = {key: f.get_slice(key).get_shape() for key in keys}
        dtypes = {f.get_slice(key).get_dtype() for key in keys}
    assert dtypes == {"F16"}
    assert all(key.startswith(PREFIXES) for key in keys)
    assert all(any(key.startswith(p) for key in keys) for p in PREFIXES)

    original = load_components(tiny_sdxl_path)
    layers = original["text_encoder_2"].config.num_hidden_layers
    # Nothing dropped or invented: one key per tensor, less q/k/v fused into in_proj (6 -> 2).
    assert len(keys) == sum(len(m.state_dict()) for m in original.values()) - 4 * layers

    te2 = original["text_encoder_2"].config
    width, projection = te2.hidden_size, te2.projection_dim
    clip_g = sf.OPEN_CLIP_PREFIX
    expected = {
        f"{sf.UNET_PREFIX}input_blocks.0.0.weight": None,
        f"{sf.UNET_PREFIX}label_emb.0.0.weight": None,  # SDXL's text_time embedding
        f"{sf.UNET_PREFIX}middle_block.1.proj_in.weight": None,
        f"{sf.UNET_PREFIX}out.2.weight": None,
        f"{sf.VAE_PREFIX}encoder.mid.attn_1.q.weight": [64, 64, 1, 1],  # 1x1 conv, 4-D
        f"{sf.VAE_PREFIX}decoder.mid.attn_1.proj_out.weight": [64, 64, 1, 1],
        f"{sf.CLIP_L_PREFIX}text_model.embeddings.position_embedding.weight": [77, 32],
        f"{sf.CLIP_L_PREFIX}text_model.final_layer_norm.weight": [32],
        f"{clip_g}positional_embedding": [77, width],
        f"{clip_g}token_embedding.weight": [49408, width],
        f"{clip_g}ln_final.weight": [width],
        f"{clip_g}text_projection": [width, projection],  # transposed Linear weight
        f"{clip_g}transformer.resblocks.0.attn.in_proj_weight": [3 * width, width],
        f"{clip_g}transformer.resblocks.0.attn.in_proj_bias": [3 * width],
        f"{clip_g}transformer.resblocks.{layers - 1}.mlp.c_proj.bias": [width],
    }
    for key, shape in expected.items():
        assert key in keys, key
        assert shape is None or list(shapes[key]) == shape, (key, shapes[key])
    for n in range(layers):  # open_clip's names only, for every layer
        block = {
            k.split(f"resblocks.{n}.")[1]
            for k in keys
            if f"{clip_g}transformer.resblocks.{n}." in k
        }
        assert block == {
            f"{module}.{kind}"
            for module in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
            for kind in ("weight", "bias")
        } | {"attn.in_proj_weight", "attn.in_proj_bias"}


def test_in_memory_components_and_atomic_write(tiny_sdxl_path, tmp_path, monkeypatch):
    """An exporter's merged UNet goes in as a module; a failed write leaves the old file intact."""
    models = load_components(tiny_sdxl_path)
    with torch.no_grad():
        models["unet"].conv_in.weight.add_(1.0)  # stands in for a merged student
    out = sf.save_components(
        **models, out_file=tmp_path / "student.safetensors", dtype=torch.float32
    )
    unet = UNet2DConditionModel.from_single_file(
        str(out),
        config=tiny_sdxl_path,
        subfolder="unet",
        local_files_only=True,
        dtype=torch.float32,
    )
    assert_same_tensors("unet", models["unet"], unet)

    before = out.read_bytes()

    def failing_save(state, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("lightning_sdxl.io.save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        sf.save_components(**models, out_file=out, dtype=torch.float32)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student.safetensors"]
