"""All-in-one SDXL checkpoint writer: the single `.safetensors` that ComfyUI's "Load Checkpoint"
and A1111 load, in Stability's original ("SGM") layout.

    model.diffusion_model.*              UNet (LDM names: input_blocks / middle_block / output_blocks)
    first_stage_model.*                  VAE (LDM names: encoder.down.N.block.M, mid.attn_1.q, ...)
    conditioner.embedders.0.transformer. CLIP-L, transformers' layout (`text_model.*`), prefixed
    conditioner.embedders.1.model.*      OpenCLIP bigG, open_clip's layout (fused in_proj, resblocks)

Why hand-written: diffusers 0.42 READS these files (`StableDiffusionXLPipeline.from_single_file`,
diffusers/loaders/single_file_utils.py) but the installed package has no WRITER; the conversion
lives only in diffusers' repository script `scripts/convert_diffusers_to_original_sdxl.py`, which
also hard-codes SDXL's 3 levels x 2 layers. Here every key is the inverse of the reader's mapping
(each part cites the reader function it inverts) and is derived from the models' configs, so the
project's tiny SDXL-architecture models convert too; tests/test_single_file.py round-trips files
through diffusers' reader and checks every tensor is reproduced exactly.

One limit is the reader's, not the file's: `create_diffusers_clip_model_from_ldm` picks the keys
for a text encoder by width alone, taking CLIP-L's (`conditioner.embedders.0.*`) for any encoder as
wide as CLIP-L. SDXL's encoders (768 and 1280 wide) are told apart and every weight loads; when the
two are equally wide (the toy and tiny models: 32 and 32), `from_single_file` fills text_encoder_2
with CLIP-L's weights and leaves its `text_projection` unloaded whatever the file holds. For such
files pass `text_encoder_2=` (e.g. the base folder's) to `from_single_file`.

Usage: `python -m lightning_sdxl.single_file --pipeline DIR --out FILE [--dtype float16]`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from lightning_sdxl.io import save_weights

UNET_PREFIX = "model.diffusion_model."  # single_file_utils.LDM_UNET_KEY
VAE_PREFIX = "first_stage_model."  # single_file_utils.LDM_VAE_KEYS[0]
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # LDM_CLIP_PREFIX_TO_REMOVE[1]
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # create_diffusers_clip_model_from_ldm, xl base

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

# A table row: (diffusers prefix, SGM prefix, renames of the rest of the key or None to keep it).
Row = tuple[str, str, dict[str, str] | None]

# Inverse of update_unet_resnet_ldm_to_diffusers (ResBlock's Sequentials in the original UNet).
UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "time_emb_proj.": "emb_layers.1.",
    "conv_shortcut.": "skip_connection.",
}
# Inverse of update_vae_resnet_ldm_to_diffusers.
VAE_RESNET = {
    "norm1.": "norm1.",
    "conv1.": "conv1.",
    "norm2.": "norm2.",
    "conv2.": "conv2.",
    "conv_shortcut.": "nin_shortcut.",
}
# Inverse of update_vae_attentions_ldm_to_diffusers.
VAE_ATTENTION = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}


def _rename(state: dict[str, torch.Tensor], table: list[Row], what: str) -> dict[str, torch.Tensor]:
    """Map every key of `state` through the first row whose diffusers prefix it starts with; a key
    no row covers means an architecture this writer does not know, so it fails loudly."""
    out = {}
    for key, tensor in state.items():
        row = next((row for row in table if key.startswith(row[0])), None)
        if row is None:
            raise ValueError(f"{what}: no SGM name for {key!r} (unsupported architecture)")
        source, target, inner = row
        rest = key[len(source) :]
        if inner is not None:
            head = next((h for h in inner if rest.startswith(h)), None)
            if head is None:
                raise ValueError(f"{what}: no SGM name for {key!r} (unknown parameter)")
            rest = inner[head] + rest[len(head) :]
        out[target + rest] = tensor
    return out


def _unet_table(config) -> list[Row]:
    """Inverse of convert_ldm_unet_checkpoint, built from the UNet's config.

    The reader walks `input_blocks.i` with `block = (i - 1) // (layers_per_block + 1)` (one slot per
    resnet, then one for the downsampler `op`), `middle_block.0/1/2` = resnet, attention, resnet,
    and `output_blocks.i` with `block = i // (layers_per_block + 1)` (the upsampler sits after the
    attention: `.2.conv` when the block has attention, else `.1.conv`). Inside an attention the
    original SpatialTransformer uses diffusers' names (norm, proj_in, transformer_blocks.N.attn1...,
    proj_out), so transformer depth needs no mapping: those keys pass through unchanged.
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):  # the reader reads one int for every block
        raise TypeError(f"layers_per_block={layers!r}: the SGM layout needs one int")
    mid = config.get("mid_block_type")
    if mid not in ("UNetMidBlock2DCrossAttn", None):
        raise ValueError(f"mid_block_type={mid!r}: the reader expects a cross-attention mid block")
    table: list[Row] = []

    def add(source: str, target: str, inner: dict[str, str] | None = None) -> None:
        table.append((source, target, inner))

    # DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    add("time_embedding.linear_1.", "time_embed.0.")
    add("time_embedding.linear_2.", "time_embed.2.")
    add("conv_in.", "input_blocks.0.0.")
    add("conv_norm_out.", "out.0.")
    add("conv_out.", "out.2.")
    # ...["addition_embed_type"] (SDXL's text_time) or ...["class_embed_type"]
    if config.get("addition_embed_type") == "text_time":
        add("add_embedding.linear_1.", "label_emb.0.0.")
        add("add_embedding.linear_2.", "label_emb.0.2.")
    elif config.get("class_embed_type") in ("timestep", "projection"):
        add("class_embedding.linear_1.", "label_emb.0.0.")
        add("class_embedding.linear_2.", "label_emb.0.2.")

    down_types = config["down_block_types"]
    for block, block_type in enumerate(down_types):
        for layer in range(layers):
            slot = 1 + block * (layers + 1) + layer
            add(f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{slot}.0.", UNET_RESNET)
            if "Attn" in block_type:
                add(f"down_blocks.{block}.attentions.{layer}.", f"input_blocks.{slot}.1.")
        if block < len(down_types) - 1:  # diffusers: every level but the last downsamples
            slot = 1 + block * (layers + 1) + layers
            add(f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{slot}.0.op.")

    if mid is not None:
        add("mid_block.resnets.0.", "middle_block.0.", UNET_RESNET)
        add("mid_block.attentions.0.", "middle_block.1.")
        add("mid_block.resnets.1.", "middle_block.2.", UNET_RESNET)

    up_types = config["up_block_types"]
    for block, block_type in enumerate(up_types):
        attention = "Attn" in block_type
        for layer in range(layers + 1):
            slot = block * (layers + 1) + layer
            add(f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{slot}.0.", UNET_RESNET)
            if attention:
                add(f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{slot}.1.")
        if block < len(up_types) - 1:  # every level but the last upsamples
            slot = block * (layers + 1) + layers
            index = 2 if attention else 1
            add(f"up_blocks.{block}.upsamplers.0.conv.", f"output_blocks.{slot}.{index}.conv.")
    return table


def sgm_unet_names(unet) -> dict[str, str]:
    """diffusers module name -> SGM (LDM) module name for every weight-bearing module of `unet`,
    e.g. `down_blocks.1.attentions.0.proj_in` -> `input_blocks.4.1.proj_in` (the kohya SDXL LoRA keys)."""
    weights = {f"{name}.weight": None for name, module in unet.named_modules() if getattr(module, "weight", None) is not None}
    renamed = _rename(weights, _unet_table(unet.config), "unet")
    return {source.removesuffix(".weight"): target.removesuffix(".weight") for source, target in zip(weights, renamed)}


def _vae_table(config) -> list[Row]:
    """Inverse of convert_ldm_vae_checkpoint, built from the VAE's config: encoder `down.i.block.j`
    (layers_per_block resnets) and `down.i.downsample`, decoder `up.(n-1-i).block.j`
    (layers_per_block + 1 resnets; the original numbers decoder levels from the bottom) and
    `up.(n-1-i).upsample`, and `mid.block_1`, `mid.attn_1`, `mid.block_2` in both."""
    down_types, up_types = config["down_block_types"], config["up_block_types"]
    if set(down_types) != {"DownEncoderBlock2D"} or set(up_types) != {"UpDecoderBlock2D"}:
        raise ValueError("the SGM VAE layout has DownEncoderBlock2D / UpDecoderBlock2D levels only")
    table: list[Row] = []

    def add(source: str, target: str, inner: dict[str, str] | None = None) -> None:
        table.append((source, target, inner))

    # DIFFUSERS_TO_LDM_MAPPING["vae"]
    for part in ("encoder", "decoder"):
        add(f"{part}.conv_in.", f"{part}.conv_in.")
        add(f"{part}.conv_out.", f"{part}.conv_out.")
        add(f"{part}.conv_norm_out.", f"{part}.norm_out.")
    add("quant_conv.", "quant_conv.")
    add("post_quant_conv.", "post_quant_conv.")

    layers = config["layers_per_block"]
    for i in range(len(down_types)):
        for j in range(layers):
            add(f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET)
        if i < len(down_types) - 1:
            add(
                f"encoder.down_blocks.{i}.downsamplers.0.conv.",
                f"encoder.down.{i}.downsample.conv.",
            )
    for i in range(len(up_types)):
        level = len(up_types) - 1 - i
        for j in range(layers + 1):
            add(f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{level}.block.{j}.", VAE_RESNET)
        if level > 0:
            add(f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{level}.upsample.conv.")
    for part in ("encoder", "decoder"):
        add(f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET)
        add(f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET)
        if config.get("mid_block_add_attention", True):
            add(f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION)
    return table


CONV_1X1 = (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")


def _vae_state_dict(vae) -> dict[str, torch.Tensor]:
    out = _rename(vae.state_dict(), _vae_table(vae.config), "vae")
    # The original mid attention is 1x1 convs: q/k/v/proj_out weights are 4-D (C, C, 1, 1). The
    # reader (update_vae_attentions_ldm_to_diffusers) squeezes 4-D or 3-D back to linear.
    for key, tensor in out.items():
        if ".mid.attn_1." in key and key.endswith(CONV_1X1) and tensor.ndim == 2:
            out[key] = tensor[:, :, None, None]
    return out


def _text_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers >= 5.6 flattened CLIPTextModel (no `text_model.` level); the file keeps it."""
    keep = ("text_model.", "text_projection.")
    return {k if k.startswith(keep) else f"text_model.{k}": v for k, v in state.items()}


def _clip_l_state_dict(text_encoder) -> dict[str, torch.Tensor]:
    # Inverse of convert_ldm_clip_checkpoint: the same transformers keys under CLIP_L_PREFIX (the
    # reader strips the prefix, then `text_model.` again for the flattened CLIPTextModel).
    return _text_model_keys(text_encoder.state_dict())


def _open_clip_state_dict(text_encoder_2) -> dict[str, torch.Tensor]:
    """Inverse of convert_open_clip_checkpoint and DIFFUSERS_TO_LDM_MAPPING["openclip"]."""
    state = dict(_text_model_keys(text_encoder_2.state_dict()))
    out = {
        "positional_embedding": state.pop("text_model.embeddings.position_embedding.weight"),
        "token_embedding.weight": state.pop("text_model.embeddings.token_embedding.weight"),
        "ln_final.weight": state.pop("text_model.final_layer_norm.weight"),
        "ln_final.bias": state.pop("text_model.final_layer_norm.bias"),
        # open_clip multiplies `x @ text_projection`: (width, projection_dim), the transpose of the
        # Linear weight; convert_open_clip_checkpoint reads this key and transposes it back. The
        # reader also reads the hidden width (to split in_proj) from its shape[0].
        "text_projection": state.pop("text_projection.weight").T.contiguous(),
    }
    for n in range(text_encoder_2.config.num_hidden_layers):
        src, dst = f"text_model.encoder.layers.{n}.", f"transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            # nn.MultiheadAttention's fused projection, q, k, v stacked in that order.
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(
                [state.pop(f"{src}self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
            )
            for hf, oc in (
                ("self_attn.out_proj", "attn.out_proj"),
                ("layer_norm1", "ln_1"),
                ("layer_norm2", "ln_2"),
                ("mlp.fc1", "mlp.c_fc"),
                ("mlp.fc2", "mlp.c_proj"),
            ):
                out[f"{dst}{oc}.{kind}"] = state.pop(f"{src}{hf}.{kind}")
    if state:
        raise ValueError(f"text_encoder_2: no open_clip name for {sorted(state)[:5]}")
    return out


def sgm_state_dict(
    unet, vae, text_encoder, text_encoder_2, dtype: torch.dtype = torch.float16
) -> dict[str, torch.Tensor]:
    """The all-in-one SGM state dict of loaded SDXL components (diffusers UNet2DConditionModel and
    AutoencoderKL, transformers CLIPTextModel and CLIPTextModelWithProjection), on the CPU in `dtype`."""
    parts = {
        UNET_PREFIX: _rename(unet.state_dict(), _unet_table(unet.config), "unet"),
        VAE_PREFIX: _vae_state_dict(vae),
        CLIP_L_PREFIX: _clip_l_state_dict(text_encoder),
        OPEN_CLIP_PREFIX: _open_clip_state_dict(text_encoder_2),
    }
    return {
        prefix + key: tensor.detach().to("cpu", dtype).contiguous()
        for prefix, state in parts.items()
        for key, tensor in state.items()
    }


def save_components(
    unet,
    vae,
    text_encoder,
    text_encoder_2,
    out_file: str | os.PathLike,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write loaded SDXL components (e.g. a merged student UNet in memory) as one SGM file."""
    return save_weights(sgm_state_dict(unet, vae, text_encoder, text_encoder_2, dtype), out_file)


def save_single_file(
    pipeline_folder: str | Path, out_file: Path, dtype: torch.dtype = torch.float16
) -> Path:
    """Convert a local diffusers SDXL folder (unet, vae, text_encoder, text_encoder_2) into the
    single SGM `.safetensors` file `out_file`, written atomically; returns its path."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = str(pipeline_folder)
    # Loaded straight in `dtype` (exact for float32, the file's precision otherwise); diffusers 0.42
    # and transformers 5 both spell it `dtype` (diffusers' `torch_dtype` is deprecated).
    kwargs = {"local_files_only": True, "dtype": dtype}
    return save_components(
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kwargs),
        AutoencoderKL.from_pretrained(folder, subfolder="vae", **kwargs),
        CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kwargs),
        CLIPTextModelWithProjection.from_pretrained(folder, subfolder="text_encoder_2", **kwargs),
        out_file,
        dtype,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", required=True, help="diffusers SDXL folder")
    parser.add_argument("--out", required=True, type=Path, help="the .safetensors file to write")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    args = parser.parse_args(argv)
    print(save_single_file(args.pipeline, args.out, DTYPES[args.dtype]))


if __name__ == "__main__":
    main()
