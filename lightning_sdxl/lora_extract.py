"""A LoRA for the base SDXL from a distilled full UNet: the per-layer low-rank SVD of W_tuned - W_base.

The recipe's LoRA phases train LoRAs relative to the stage's teacher (each stage starts from the
previous stage's merged, fully trained UNet), so only the first stage's LoRA sits on the base model.
What users load onto base SDXL (`pipe.load_lora_weights`, ComfyUI, A1111) is this extraction: for
every LCM-LoRA target layer (METHOD.md 2), delta = W_tuned - W_base (a conv's (out, in, k, k) as
(out, in k k)), truncated SVD U S V^T at rank r, B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T (a conv's A
keeps the k x k kernel, B is 1 x 1, as peft's conv LoRA). Changes a LoRA cannot carry (biases,
norms, conv_in/conv_out, the time embedding) are measured and reported, not silently dropped.

Usage: python -m lightning_sdxl.lora_extract --base <SDXL folder> --unet <export>/unet --rank 64 --out DIR
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, set_peft_model_state_dict
from peft.tuners.tuners_utils import check_target_module_exists
from torch import nn

from lightning_sdxl.export import ADAPTER, INFO_FILE, portable_model_name, save_lora_files
from lightning_sdxl.io import atomic_dir
from lightning_sdxl.models.student import LCM_LORA_TARGET_MODULES

log = logging.getLogger(__name__)


def target_layers(unet: nn.Module, targets: tuple[str, ...] = LCM_LORA_TARGET_MODULES) -> dict[str, nn.Module]:
    """The Linear and Conv2d layers a LoRA on `targets` adapts, matched by peft's own rule."""
    config = LoraConfig(target_modules=list(targets))
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d)) and check_target_module_exists(config, name)
    }


def low_rank_factors(
    delta: torch.Tensor, rank: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(A, B, relative error) with B @ A the best rank-`rank` approximation of `delta` (out, ...)."""
    matrix = delta.reshape(delta.shape[0], -1).to(device, torch.float64)  # (out, in k k)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b, a = u[:, :r] * root, root[:, None] * vh[:r]  # (out, r), (r, in k k)
    total = matrix.square().sum()
    error = float(((matrix - b @ a).square().sum() / total).sqrt()) if total > 0 else 0.0
    return a.float().cpu(), b.float().cpu(), error


def extract_lora(
    base: UNet2DConditionModel, tuned: UNet2DConditionModel, rank: int = 64, device: str | torch.device | None = None
) -> tuple[UNet2DConditionModel, dict]:
    """A copy of `base` whose peft adapter (scale 1) approximates `tuned`, and what it leaves out.

    Returns:
        (the adapted UNet, info): info["relative_error"] is ||delta - BA|| / ||delta|| over all target
        layers together; info["uncaptured_fraction"] the share of the total squared weight change
        that lies outside the target layers' weights (biases, norms, embeddings), which no LoRA holds.
    """
    base_state, tuned_state = base.state_dict(), tuned.state_dict()
    if base_state.keys() != tuned_state.keys() or any(v.shape != tuned_state[k].shape for k, v in base_state.items()):
        raise ValueError("--unet is not a fine-tune of --base: the two UNets have different layers.")
    layers = target_layers(base)
    # SDXL's ~700 SVDs take minutes on a CPU (while DDP ranks wait at a barrier), seconds on a GPU.
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    factors, ranks = {}, {}
    captured = error_sq = 0.0
    for name, layer in layers.items():
        delta = tuned_state[f"{name}.weight"].double() - base_state[f"{name}.weight"].double()
        a, b, error = low_rank_factors(delta, rank, device)
        change = float(delta.square().sum())
        captured += change
        error_sq += error**2 * change
        if isinstance(layer, nn.Conv2d):
            a = a.reshape(a.shape[0], *layer.weight.shape[1:])  # (r, in, k, k): the layer's kernel
            b = b[:, :, None, None]  # (out, r, 1, 1)
        factors[f"{name}.lora_A.weight"], factors[f"{name}.lora_B.weight"] = a, b
        ranks[name] = a.shape[0]
    # Every other tensor's change, in one pass: what no LoRA on these layers can hold.
    target_weights = {f"{name}.weight" for name in layers}
    outside = {
        key: float((tuned_state[key].double() - base_state[key].double()).square().sum())
        for key in base_state
        if key not in target_weights
    }
    total = captured + sum(outside.values())
    short = {name: r for name, r in ranks.items() if r != rank}  # layers narrower than the rank
    config = LoraConfig(
        r=rank, lora_alpha=rank, rank_pattern=short, alpha_pattern=short,
        target_modules=list(LCM_LORA_TARGET_MODULES), init_lora_weights=False,
    )
    adapted = copy.deepcopy(base)
    adapted.add_adapter(config, adapter_name=ADAPTER)
    result = set_peft_model_state_dict(adapted, factors, adapter_name=ADAPTER)
    if any("lora_" in key for key in result.unexpected_keys):
        raise RuntimeError(f"extracted LoRA keys did not load: {result.unexpected_keys[:3]}")
    info = {
        "rank": rank,
        "layers": len(layers),
        "relative_error": (error_sq / captured) ** 0.5 if captured > 0 else 0.0,
        "uncaptured_fraction": (total - captured) / total if total > 0 else 0.0,
        "uncaptured_tensors": sorted(key for key, change in outside.items() if change > 0)[:20],
    }
    return adapted, info


def extract_to_folder(base_path: str, unet_path: str, out: Path, rank: int = 64, dtype=torch.float32) -> dict:
    """Write lora.safetensors, lora_kohya.safetensors and extract_info.json for base + LoRA ~ tuned."""
    base = UNet2DConditionModel.from_pretrained(base_path, subfolder="unet", torch_dtype=torch.float32)
    tuned = UNet2DConditionModel.from_pretrained(unet_path, torch_dtype=torch.float32)
    adapted, info = extract_lora(base, tuned, rank)
    info = {"base_model": portable_model_name(str(base_path)), "unet": portable_model_name(str(unet_path)), **info}
    with atomic_dir(out) as folder:
        save_lora_files(adapted, folder, dtype)
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log.info(
        "LoRA rank %d: relative error %.3g over %d layers; %.3g of the weight change is outside them",
        rank, info["relative_error"], info["layers"], info["uncaptured_fraction"],
    )
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_sdxl.lora_extract", description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="the base SDXL folder (its unet/ is W_base)")
    parser.add_argument("--unet", required=True, help="the distilled full UNet folder, e.g. <phase>/export/unet")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--out", required=True, type=Path, help="the LoRA folder (replaced atomically)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for path in (Path(args.base) / "unet", Path(args.unet)):
        if not (path / "config.json").exists():
            parser.error(f"{path} is not a diffusers UNet folder (no config.json)")
    extract_to_folder(args.base, args.unet, args.out, args.rank, getattr(torch, args.dtype))


if __name__ == "__main__":
    main()
