"""Exports: a trained student as the files other tools load (METHOD.md 5).

An export folder holds
    unet/                   the student UNet, LoRA merged in (diffusers folder, safetensors)
    scheduler/              EulerDiscreteScheduler, timestep_spacing="trailing", the student's prediction type
    lora.safetensors        LoRA students: diffusers format (`pipe.load_lora_weights`), with adapter metadata
    lora_kohya.safetensors  LoRA students: kohya names (`lora_unet_*`, `lora_down`/`lora_up`, `.alpha`)
    sdxl_single_file.safetensors  the all-in-one checkpoint: UNet, VAE, both text encoders (SGM layout)
    comfyui_workflow.json   ComfyUI's API-format graph for the single file (comfyui.py)
    discriminator.safetensors  adversarial students: the trained discriminator (the recipe's next
                            phase of the stage continues it; not an inference file)
    export_info.json        base model, steps, prediction type, stage, loss, files

so that `StableDiffusionXLPipeline.from_pretrained(base, unet=UNet2DConditionModel.from_pretrained(
out / "unet"), scheduler=EulerDiscreteScheduler.from_pretrained(out / "scheduler"))` with
`guidance_scale=0` and the student's step count reproduces the student (tests/test_export.py).

The kohya keys are sd-scripts' SDXL names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`):
diffusers' kohya loader (`_maybe_map_sgm_blocks_to_diffusers`), ComfyUI (`model_lora_keys_unet` maps
`lora_unet_<SGM key>`) and A1111 (which passes SGM names through) read them. A1111 maps diffusers
names (`lora_unet_down_blocks_*`) with SD 1.x's layout and would drop SDXL's `up_blocks.0` upsampler.

The all-in-one single file, `sdxl_single_file.safetensors` (ComfyUI's Load Checkpoint, A1111), is
written by `single_file.py` (diffusers reads these files but has no writer): the merged UNet with the
base's VAE and text encoders, in the export's dtype. For x0 students ComfyUI needs the
ModelSamplingDiscrete node set to x0 (export_info.json says so); diffusers reads the prediction type
from scheduler/.

The writers take a module; `python -m lightning_sdxl.export --checkpoint last.ckpt --out DIR` (export/__main__.py)
re-exports a checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from lightning_sdxl.comfyui import write_workflow
from lightning_sdxl.finite_guard import NonFiniteTrainingError, all_finite
from lightning_sdxl.io import atomic_dir
from lightning_sdxl.models.loading import cast, frozen_encoders, load_sdxl, looks_local
from lightning_sdxl.single_file import save_components, sgm_unet_names

log = logging.getLogger(__name__)

ADAPTER = "default"  # the adapter name `unet.add_adapter` gives the student's LoRA
UNET_DIR, SCHEDULER_DIR, INFO_FILE = "unet", "scheduler", "export_info.json"
LORA_FILE, KOHYA_FILE = "lora.safetensors", "lora_kohya.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
SINGLE_FILE = "sdxl_single_file.safetensors"
COMFYUI_FILE = "comfyui_workflow.json"  # ComfyUI's API-format graph for the single file (comfyui.py)


def is_lora_student(module) -> bool:
    return module.pair.student_type == "lora"


def merged_unet(module, dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """A copy of the student UNet with any LoRA merged in; the module's own UNet is not touched.

    Args:
        module: a `DistillationModule`.
        dtype: dtype of the returned UNet (the merge itself runs in float32).
    """
    source = module.pair.unet
    # Pre-filled deepcopy memo: each weight is copied straight to the CPU in float32, so a UNet
    # training on a GPU needs no second GPU copy (SDXL: 10 GB) at the end of training.
    memo = {
        id(tensor): tensor.detach().to("cpu", torch.float32, copy=True)
        for tensor in source.buffers()
    }
    memo.update(
        {
            id(parameter): torch.nn.Parameter(
                parameter.detach().to("cpu", torch.float32, copy=True), False
            )
            for parameter in source.parameters()
        }
    )
    unet = copy.deepcopy(source, memo).eval()
    if is_lora_student(module):
        unet.fuse_lora()  # peft merge: W + (alpha / r) B A, per adapted layer
        unet.unload_lora()  # drop the adapter modules, keep the merged base layers
    return cast(unet.requires_grad_(False), dtype)


def inference_scheduler(module) -> EulerDiscreteScheduler:
    """The base model's Euler scheduler with trailing spacing and the student's prediction type."""
    config = EulerDiscreteScheduler.load_config(module.hparams.model_path, subfolder="scheduler")
    return EulerDiscreteScheduler.from_config(
        config, timestep_spacing="trailing", prediction_type=module.student_prediction.name
    )


def save_lora_files(unet: UNet2DConditionModel, folder: Path, dtype: torch.dtype = torch.float32) -> None:
    """The LoRA of a peft-adapted UNet as `lora.safetensors` (diffusers: peft names with the adapter's
    `LoraConfig` as metadata, from which `load_lora_weights` rebuilds rank and alpha) and `lora_kohya.safetensors`."""
    StableDiffusionXLPipeline.save_lora_weights(
        folder,
        unet_lora_layers=lora_state_dict(unet, dtype),
        weight_name=LORA_FILE,
        unet_lora_adapter_metadata=unet.peft_config[ADAPTER].to_dict(),
    )
    save_file(kohya_state_dict(unet, dtype), folder / KOHYA_FILE, metadata={"format": "pt"})


def lora_state_dict(unet: UNet2DConditionModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The UNet's LoRA weights as `save_lora_weights` takes them: peft names (`<module>.lora_A.weight`).

    Not passed through diffusers' `convert_state_dict_to_diffusers`: in diffusers 0.42 it renames only
    attention keys (`to_q.lora_A` -> `to_q.lora.down`) and leaves the conv, feed-forward and proj keys
    of LCM-LoRA's targets as `lora_A`; `load_lora_weights` picks the naming from the first key alone,
    so such a mixed file loads without its attention (or without its other) layers, with only a
    warning. Peft names are what diffusers' own `save_lora_adapter` writes, and they load whole.
    """
    peft_state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    return {key: value.detach().to("cpu", dtype).contiguous() for key, value in peft_state.items()}


def kohya_state_dict(unet: UNet2DConditionModel, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The UNet's LoRA in sd-scripts' SDXL naming: `lora_unet_<SGM module>.{lora_down,lora_up}.weight`, `.alpha`.

    diffusers' `convert_state_dict_to_kohya` writes the layers' diffusers names (`lora_unet_down_blocks_*`);
    they are renamed to the SGM (LDM) names sd-scripts writes for SDXL (`lora_unet_input_blocks_*`,
    single_file.py's UNet table), which diffusers, ComfyUI and A1111 all map: A1111 reads diffusers
    names with SD 1.x's layout and would drop SDXL's `up_blocks.0` upsampler LoRA. Every `.alpha`
    is the adapter's real alpha (per layer, from peft's `alpha_pattern` when set), where diffusers
    writes the rank.
    """
    peft_state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    kohya = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in peft_state.items()})
    sgm = {"lora_unet_" + name.replace(".", "_"): "lora_unet_" + ldm.replace(".", "_") for name, ldm in sgm_unet_names(unet).items()}
    alphas = {
        "lora_unet_" + name.replace(".", "_"): float(layer.lora_alpha[ADAPTER])
        for name, layer in unet.named_modules()
        if hasattr(layer, "lora_alpha") and ADAPTER in getattr(layer, "lora_alpha", {})
    }
    state = {}
    for key, value in kohya.items():
        name, _, suffix = key.partition(".")
        if name not in alphas:
            raise KeyError(f"No peft LoRA layer matches the kohya key {key!r}.")
        if suffix == "alpha":
            value = torch.tensor(alphas[name])
        state[f"{sgm[name]}.{suffix}"] = value.detach().to("cpu", dtype).contiguous()
    return state


def portable_model_name(path: str) -> str:
    """A hub id as it is; a local folder by its name (an absolute path names another machine's
    disk; the packaged toy teacher lives inside site-packages)."""
    return Path(path).name if looks_local(path) else path


def export_info(module) -> dict:
    """What a user needs besides the weights: base model, sampler settings, stage and loss."""
    hparams, stage, student = module.hparams, module.stage, module.student_spec
    info = {
        "base_model": portable_model_name(hparams.model_path),
        "num_inference_steps": stage.student_steps,
        "resolution": hparams.resolution,
        "guidance_scale": 0.0,
        "scheduler": "EulerDiscreteScheduler(timestep_spacing='trailing')",
        "prediction_type": module.student_prediction.name,
        "stage": f"{stage.teacher_steps}to{stage.student_steps}",
        "loss": module.loss.name,
        "student_type": module.pair.student_type,
        "files": [UNET_DIR, SCHEDULER_DIR, INFO_FILE],
    }
    if module.segmented:  # Hyper-SD's TSCD: k segments over the teacher's N-step grid
        info["stage"] = f"tscd{stage.segments} (teacher grid {stage.teacher_steps})"
        info["consistency_target"] = stage.consistency_target  # the online student is exported
        # One LoRA for 1, 2, 4, 8 steps; TCD's k-step grid (diffusers 0.42) is the trailing grid of the segment ends.
        info["scheduler"] = f"TCDScheduler (eta 0: the trained segment map) or {info['scheduler']}"
    if getattr(module, "_trainer", None) is not None:
        info["global_step"] = module.trainer.global_step  # Lightning's: optimizer steps
    if is_lora_student(module):
        info.update(lora_rank=student.lora_rank, lora_alpha=student.lora_alpha or student.lora_rank)
        info["files"] += [LORA_FILE, KOHYA_FILE]
    if module.discriminator is not None:
        info["files"].append(DISCRIMINATOR_FILE)
    if module.student_prediction.name == "sample":
        info["comfyui"] = "an x0 model: add ModelSamplingDiscrete with sampling=x0; Euler, sgm_uniform, CFG 1"
    else:
        info["comfyui"] = "Euler sampler, sgm_uniform scheduler, CFG 1"
    if hparams.get("teacher_path"):
        info["teacher"] = portable_model_name(hparams.teacher_path)
    signal = getattr(module, "measure_discriminator_signal", lambda gather: None)(gather=False)  # rank 0 only
    if signal:
        info["discriminator"] = signal  # this rank's accuracy over the last fifth of training, no-signal flag
    return info


def single_file_encoders(module):
    """The VAE and text encoders the all-in-one file holds: the module's, or for a run from a latent
    cache (which has no text encoders and no VAE encoder in memory) both read from its model_path."""
    if module.text_encoder is not None:
        return module.vae, module.text_encoder
    components = load_sdxl(module.hparams.model_path, module.hparams.model_variant, unet=False)
    return frozen_encoders(components, module.vae.dtype)


def export_student(
    module,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    info: dict | None = None,
    single_file: bool = True,
) -> Path:
    """Write every export of `module`'s student into `out_dir`, atomically (module docstring).

    Args:
        module: a trained `DistillationModule`.
        out_dir: the export folder; a previous export there is replaced only once the new one is complete.
        dtype: dtype of the written weights (float32, or float16 / bfloat16 for release files).
        info: extra entries for export_info.json.
        single_file: also write the all-in-one checkpoint (SDXL: 7 GB in float16).

    Returns:
        The export folder.
    """
    out_dir = Path(out_dir)
    trainable = [p.detach() for p in module.pair.trainable_parameters()]
    if not all_finite(trainable):  # NaN weights are never shipped (issue 15)
        raise NonFiniteTrainingError(
            f"The student's weights hold NaN or inf: nothing was exported to {out_dir}. Resume from an "
            "earlier checkpoint with a lower learning rate."
        )
    with atomic_dir(out_dir) as folder:
        unet = merged_unet(module, dtype)
        unet.save_pretrained(folder / UNET_DIR, safe_serialization=True)
        if single_file:
            vae, encoders = single_file_encoders(module)
            save_components(unet, vae, encoders.text_encoder, encoders.text_encoder_2, folder / SINGLE_FILE, dtype)
        inference_scheduler(module).save_pretrained(folder / SCHEDULER_DIR)
        if is_lora_student(module):
            if module.student_prediction.name != module.teacher_prediction.name:
                log.warning(
                    "The LoRA changes the prediction type to %r: load it with a scheduler of that "
                    "prediction_type (the full UNet export's scheduler/ has it).",
                    module.student_prediction.name,
                )
            save_lora_files(module.pair.unet, folder, dtype)
        if module.discriminator is not None:
            module.discriminator.save(folder / DISCRIMINATOR_FILE)
        info = {**export_info(module), **(info or {})}
        if single_file:
            info["files"] += [SINGLE_FILE, COMFYUI_FILE]
            write_workflow(
                folder / COMFYUI_FILE, SINGLE_FILE, module.stage.student_steps,
                module.hparams.resolution, module.student_prediction.name,
            )
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    log.info("Exported the student to %s", out_dir)
    return out_dir
