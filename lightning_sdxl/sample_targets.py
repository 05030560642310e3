"""What `python -m lightning_sdxl.sample` samples: the models a command line names (a checkpoint, an
export, a release, a diffusers SDXL folder), each with the base model that supplies its VAE and
text encoders, its step count and resolution; and loading them (lightning_sdxl/sample.py's docstring
describes the rules for users)."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

from lightning_sdxl import ASSETS_DIR
from lightning_sdxl.checkpoint_hparams import is_distillation, read_hparams
from lightning_sdxl.errors import ConfigError, MissingPathError
from lightning_sdxl.evaluate import ModelUnderTest, load_model_under_test
from lightning_sdxl.models.loading import check_pipeline_folder
from lightning_sdxl.models.tiny import default_cache_dir
from lightning_sdxl.models.vae import vae_scale_factor

RELEASES_FILE, INFO_FILE, WORKFLOW_FILE = "releases.json", "export_info.json", "comfyui_workflow.json"
MODEL_HELP = (
    "a Lightning checkpoint (.ckpt), an export folder (unet/, scheduler/, export_info.json), a release "
    "(releases.json), or a diffusers SDXL folder with --steps"
)


@dataclass
class Target:
    """One model to sample, as the command line named it; nothing loaded yet."""

    name: str
    kind: str  # "checkpoint" | "unet" (an export's unet/) | "pipeline" (a full SDXL folder)
    path: Path
    base: str | None  # VAE + text encoders + noise schedule ("pipeline": the folder itself)
    steps: int
    resolution: int | None = None  # None: the UNet's sample size times the VAE factor


def _is_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not Path(name).exists() and not name.startswith((".", "~", "/"))


def _usable_base(path: str | None) -> str | None:
    """`path` if it is a complete local SDXL folder or a hub id this machine can load, else None."""
    if not path:
        return None
    if not Path(path).exists() and not _is_hub_id(path):
        return None  # a bare folder name ("toy-sdxl") is never sent to the hub
    try:
        check_pipeline_folder(str(path))
    except FileNotFoundError:
        return None
    return str(path)


def _recorded_model_paths(run_dir: Path) -> list[str]:
    """The model path a run loaded, from its own records: the loggers' hparams.yaml (the resolved
    path, the tiny model's included) and Hydra's .hydra/config.yaml."""
    found = [_yaml(run_dir / logger / "hparams.yaml").get("model_path") for logger in ("tensorboard", "csv")]
    found.append((_yaml(run_dir / ".hydra" / "config.yaml").get("model") or {}).get("path"))
    return [str(path) for path in found if path]


def find_base(recorded: str | None, run_dir: Path, what: str) -> str:
    """The base model of a run's export or checkpoint: the recorded path or hub id when usable here,
    else the run's own records of the full path, else a packaged or cached folder of that name."""
    candidates = [recorded, *_recorded_model_paths(run_dir)]
    if recorded:
        name = Path(recorded).name
        candidates += [str(ASSETS_DIR / name), str(default_cache_dir() / name)]
    for candidate in candidates:
        if usable := _usable_base(candidate):
            return usable
    raise MissingPathError(
        f"{what} names its base model {recorded!r}, which is not a diffusers SDXL folder or cached hub id "
        "here: pass --base <the SDXL folder or hub id it was trained from> (its VAE and text encoders are used)."
    )


def _check_base(base: str) -> str:
    try:
        check_pipeline_folder(base)
    except FileNotFoundError as error:
        raise MissingPathError(str(error).replace("model.path=", "--base ", 1)) from error
    return base


def _vae_factor(base: str | None) -> int | None:
    """The VAE's downsampling factor of a local base folder (None for a hub id)."""
    config = Path(str(base)) / "vae" / "config.json"
    return vae_scale_factor(json.loads(config.read_text())) if config.is_file() else None


def _yaml(path: Path) -> dict:
    """A run record (hparams.yaml, .hydra/config.yaml) as a dict; {} when absent or unreadable."""
    if not path.is_file():
        return {}
    try:
        loaded = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"{path} is not a readable {what} ({error}): re-export, or pass another model.") from error


def _workflow_resolution(export: Path) -> int | None:
    """The training resolution the export's ComfyUI workflow was written with."""
    try:
        graph = json.loads((export / WORKFLOW_FILE).read_text())
        return next(int(node["inputs"]["width"]) for node in graph.values() if node["class_type"] == "EmptyLatentImage")
    except (OSError, ValueError, KeyError, TypeError, AttributeError, StopIteration):
        return None


def _run_resolution(run_dir: Path) -> int | None:
    for logger in ("tensorboard", "csv"):
        if resolution := _yaml(run_dir / logger / "hparams.yaml").get("resolution"):
            return int(resolution)
    return None


def _resolve_in_release(recorded: str, releases_dir: Path) -> Path:
    """A releases.json path as written, else the same path under the releases.json's folder (a run
    moved or copied elsewhere, or written with a relative output_dir)."""
    path = Path(recorded)
    if path.exists():
        return path
    for start in range(1, len(path.parts)):
        candidate = releases_dir.joinpath(*path.parts[start:])
        if candidate.exists():
            return candidate
    return path


def export_target(export: Path, args: argparse.Namespace, name: str | None = None) -> Target:
    info = _json(export / INFO_FILE, "export_info.json")
    if not (export / "unet" / "config.json").is_file() or not (export / "scheduler").is_dir():
        raise MissingPathError(f"{export} lacks unet/ or scheduler/: give a complete export folder (re-export it).")
    if args.base:
        base = _check_base(args.base)
    else:
        base = find_base(info.get("base_model"), export.parent, str(export / INFO_FILE))
    resolution = (
        args.resolution or info.get("resolution") or _run_resolution(export.parent) or _workflow_resolution(export)
    )
    return Target(
        name or export.parent.name or "export", "unet", export / "unet", base,
        int(info["num_inference_steps"]) if args.steps is None else args.steps, resolution,
    )


def checkpoint_target(path: Path, args: argparse.Namespace) -> Target:
    hparams = read_hparams(path)  # mmap: reads no weights
    if not is_distillation(hparams):
        raise ConfigError(
            f"{path} is not a distillation checkpoint (no student_steps): sample a teacher run's export/ "
            "(a diffusers SDXL folder) with --steps N."
        )
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    base = _check_base(args.base) if args.base else find_base(hparams.get("model_path"), run_dir, str(path))
    return Target(
        f"{run_dir.name}/{path.stem}", "checkpoint", path, base,
        int(hparams["stage"]["student_steps"]) if args.steps is None else args.steps,
        args.resolution or hparams.get("resolution"),
    )


def release_targets(releases: Path, args: argparse.Namespace) -> list[Target]:
    entries = _json(releases, "releases.json")
    available = sorted((int(entry["num_inference_steps"]) for entry in entries.values()), reverse=True)
    if args.steps is not None and args.steps not in available:
        raise ConfigError(
            f"--steps {args.steps}: {releases} has {', '.join(map(str, available))} steps; pick one of them "
            "or drop --steps to sample them all."
        )
    exports = {int(entry["num_inference_steps"]): _resolve_in_release(entry["unet"], releases.parent).parent
               for entry in entries.values()}
    # One recipe, one training resolution: the first entry with a record of it speaks for all.
    recorded = [_run_resolution(export.parent) or _workflow_resolution(export) for export in exports.values()]
    resolution = args.resolution or next((value for value in recorded if value), None)
    targets = []
    for entry in entries.values():
        steps = int(entry["num_inference_steps"])
        if args.steps is not None and steps != args.steps:
            continue
        name = releases.parent.name or "release"
        # A TSCD chain's release has no pipeline of its own (one LoRA on the base): its export is sampled.
        pipeline = _resolve_in_release(entry["pipeline"], releases.parent) if "pipeline" in entry else None
        if pipeline and not args.base and _usable_base(str(pipeline)):  # the stage's whole SDXL folder
            targets.append(Target(name, "pipeline", pipeline, str(pipeline), steps, resolution))
        elif (exports[steps] / INFO_FILE).is_file():  # moved without the base's links, or --base: its export
            target = export_target(exports[steps], argparse.Namespace(**{**vars(args), "steps": steps}), name)
            target.resolution = target.resolution or resolution
            targets.append(target)
        else:
            raise MissingPathError(
                f"{releases}: the {steps}-step release's pipeline {entry.get('pipeline')} and UNet {entry['unet']} "
                "are not here: copy the run folder whole, or sample its export/ folders with --base."
            )
    return targets


def targets_of(path_text: str, args: argparse.Namespace) -> list[Target]:
    """The model(s) one command-line MODEL names."""
    path = Path(path_text)
    if not path.exists():
        raise MissingPathError(f"{path} does not exist: give {MODEL_HELP}.")
    if path.is_file() and path.suffix == ".ckpt":
        return [checkpoint_target(path, args)]
    if path.is_file() and path.suffix == ".json":
        return release_targets(path, args)
    if path.is_dir():
        if (path / INFO_FILE).is_file():
            return [export_target(path, args)]
        if path.name == "unet" and (path.parent / INFO_FILE).is_file():
            return [export_target(path.parent, args)]
        if (path / RELEASES_FILE).is_file():
            return release_targets(path / RELEASES_FILE, args)
        if (path / "export" / INFO_FILE).is_file():  # a run folder
            return [export_target(path / "export", args, path.name)]
        if (path / "model_index.json").is_file():
            if args.steps is None:
                raise ConfigError(f"{path} is a diffusers SDXL folder: give the steps to sample it with, --steps N.")
            return [Target(path.name, "pipeline", path, _check_base(str(path)), args.steps, args.resolution)]
    raise ConfigError(f"{path} is none of {MODEL_HELP}.")


def resolve_targets(args: argparse.Namespace) -> list[Target]:
    targets = [target for model in args.models for target in targets_of(model, args)]
    for target in targets:
        if target.steps < 1:
            raise ConfigError(f"--steps {target.steps}: give at least 1.")
        factor = _vae_factor(target.base)
        if target.resolution is not None and (target.resolution < 8 or (factor and target.resolution % factor)):
            raise ConfigError(
                f"--resolution {target.resolution}: give the image size in pixels, a multiple of "
                f"{factor or 8} (the VAE's downsampling), e.g. 1024."
            )
    keys = [(target.name, target.steps) for target in targets]
    for index, target in enumerate(targets):  # the same name at the same steps twice: number them
        if keys.count(keys[index]) > 1:
            target.name = f"{target.name}#{keys[: index + 1].count(keys[index])}"
    return targets


# ---- loading and sampling -----------------------------------------------------------------------


def load_checkpoint_model(target: Target, device: torch.device) -> ModelUnderTest:
    """A checkpoint's student (LoRA merged) on its base's VAE and text encoders: evaluate's
    checkpoint branch, with the base given (--base or found) instead of the recorded model_path, and
    the files only training reads (skip-level teacher, student and discriminator init) not required."""
    from lightning_sdxl.export import merged_unet
    from lightning_sdxl.module import DistillationModule

    module = DistillationModule.for_inference(
        target.path, model_path=target.base, frozen_dtype="float32", teacher_path=None, student_init=None
    )
    return ModelUnderTest(
        name=target.name,
        unet=merged_unet(module).to(device),
        prediction_type=module.student_prediction.name,
        text_encoder=module.text_encoder.to(device),
        vae=module.vae.to(device).eval(),
        schedule=module.schedule.to(device),
    )


def load_target(target: Target, device: torch.device) -> ModelUnderTest:
    if target.kind == "checkpoint":
        return load_checkpoint_model(target, device)
    # An export's unet/ (prediction type from its scheduler/) on the base, or a whole SDXL folder
    # sampled as evaluate samples a teacher (its own UNet and scheduler's prediction type).
    kind = "unet" if target.kind == "unet" else "teacher"
    cfg = OmegaConf.create({
        "model": {"path": target.base},
        "target": {"kind": kind, "path": str(target.path), "name": target.name, "prediction_type": None},
    })
    return load_model_under_test(cfg, device)
