"""python -m lightning_sdxl.sample: images of a distilled model for your own prompts, and a labelled grid.

    python -m lightning_sdxl.sample outputs/<run>/export --prompt "a photo of a cat" --seeds 0 1 2
    python -m lightning_sdxl.sample outputs/<recipe run>/releases.json --prompts-file prompts.txt
    python -m lightning_sdxl.sample outputs/<run>/checkpoints/last.ckpt --prompt "..." --steps 2

A model is a Lightning checkpoint (.ckpt), an export folder (unet/ + scheduler/ + export_info.json;
a run folder stands for its export/), a release (the recipe's releases.json, or the run folder
holding it: every step count it lists, or `--steps N` for one), or a diffusers SDXL folder (a recipe
stage's teacher/; give --steps). Several models may be given; each is sampled at its own step count
with guidance 0 (no CFG), the way it was trained, through the project's sampler
(lightning_sdxl.evaluate.generate_images: trailing timesteps, the prediction type of the export's
scheduler/, x0 for the 1-step models).

The VAE and text encoders come from `--base` when given, else from the model's own record: a
release's pipeline folder, a checkpoint's model_path, or an export's base model (export_info.json
names only the folder or hub id; the run's logged hparams.yaml or .hydra/config.yaml beside export/
give the full path, and the packaged toy teacher and the tiny model are found by name).

Writes into --out: one PNG per (model, prompt, seed), named
`<model>_<steps>step_p<prompt index>_<prompt words>_seed<seed>.png`, `grid.png` (rows: model and
steps; columns: prompt and seed; PIL's default font) and `samples.json` (every image with its model,
steps, prompt and seed). Bad input (a missing path, no prompts, a step count the release lacks)
stops with one line naming the fix, before any model loads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from lightning_sdxl import ASSETS_DIR
from lightning_sdxl.errors import ConfigError, MissingPathError
from lightning_sdxl.evaluate import ModelUnderTest, generate_images, load_model_under_test
from lightning_sdxl.io import atomic_path
from lightning_sdxl.models.loading import check_pipeline_folder
from lightning_sdxl.models.tiny import default_cache_dir
from lightning_sdxl.models.vae import vae_scale_factor

RELEASES_FILE, INFO_FILE, WORKFLOW_FILE = "releases.json", "export_info.json", "comfyui_workflow.json"
GRID_FILE, INDEX_FILE = "grid.png", "samples.json"
MAX_CELL = 512  # grid cells: larger images (SDXL's 1024 px) are shrunk; the PNGs keep full size
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


# ---- the command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_sdxl.sample", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:5]),
    )
    parser.add_argument("models", nargs="+", metavar="MODEL", help=MODEL_HELP)
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    parser.add_argument("--prompts-file", help="a text file with one prompt per line (blank lines skipped)")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=int, nargs="+", help="the seeds of every prompt's images")
    seeds.add_argument("--seed", type=int, default=0, help="first seed: --seed S gives seeds S, S+1, ... (default 0)")
    parser.add_argument(
        "--num-images-per-prompt", type=int, default=None,
        help="images per prompt, seeds --seed, --seed + 1, ... (default 1; not with --seeds)",
    )
    parser.add_argument(
        "--steps", type=int,
        help="a release's step count to sample (default: all it lists); other models: the steps to sample with "
        "(default: the model's own)",
    )
    parser.add_argument(
        "--base",
        help="the base SDXL folder or hub id whose VAE and text encoders to use (default: a release's pipeline, a "
        "checkpoint's model_path, an export's base model from export_info.json or the run's records)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: outputs/samples/<date>/<time>)")
    parser.add_argument("--resolution", type=int, help="image size in pixels (default: the training resolution)")
    parser.add_argument("--guidance-scale", type=float, default=0.0, help="CFG scale (default 0: none, as distilled)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default 4)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = [prompt.strip() for prompt in args.prompt if prompt.strip()]
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise MissingPathError(f"--prompts-file {path} does not exist: give a text file with one prompt per line.")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"--prompts-file {path} holds no prompts: write one prompt per line.")
    if not prompts:
        raise ConfigError('no prompts: give --prompt "..." (repeatable) or --prompts-file FILE (one prompt per line).')
    return prompts


def seed_list(args: argparse.Namespace) -> list[int]:
    if args.seeds is not None:
        if args.num_images_per_prompt is not None:
            raise ConfigError("give either --seeds or --num-images-per-prompt (with --seed), not both.")
        return list(dict.fromkeys(args.seeds))
    count = 1 if args.num_images_per_prompt is None else args.num_images_per_prompt
    if count < 1:
        raise ConfigError(f"--num-images-per-prompt {count}: give at least 1.")
    return [args.seed + index for index in range(count)]


# ---- what each model needs, found before anything loads ----------------------------------------


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
    saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # hparams only; mmap reads no weights
    hparams = saved.get("hyper_parameters") or {}
    if "student_steps" not in hparams:
        raise ConfigError(
            f"{path} is not a distillation checkpoint (no student_steps): sample a teacher run's export/ "
            "(a diffusers SDXL folder) with --steps N."
        )
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    base = _check_base(args.base) if args.base else find_base(hparams.get("model_path"), run_dir, str(path))
    return Target(
        f"{run_dir.name}/{path.stem}", "checkpoint", path, base,
        int(hparams["student_steps"]) if args.steps is None else args.steps,
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
        pipeline = _resolve_in_release(entry["pipeline"], releases.parent)
        if not args.base and _usable_base(str(pipeline)):  # the stage's whole SDXL folder
            targets.append(Target(name, "pipeline", pipeline, str(pipeline), steps, resolution))
        elif (exports[steps] / INFO_FILE).is_file():  # moved without the base's links, or --base: its export
            target = export_target(exports[steps], argparse.Namespace(**{**vars(args), "steps": steps}), name)
            target.resolution = target.resolution or resolution
            targets.append(target)
        else:
            raise MissingPathError(
                f"{releases}: the {steps}-step release's pipeline {entry['pipeline']} and UNet {entry['unet']} "
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

    with warnings.catch_warnings():  # the frozen parts are absent by design (they reload from the base)
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        module = DistillationModule.load_from_checkpoint(
            str(target.path), map_location="cpu", weights_only=True, model_path=target.base, frozen_dtype="float32",
            teacher_path=None, student_init=None, discriminator_init=None,
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


def slug(text: str, limit: int = 40) -> str:
    words = re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()
    return words[:limit].rstrip("-") or "prompt"


def image_name(target: Target, prompt_index: int, prompt: str, seed: int) -> str:
    return f"{slug(target.name, 60)}_{target.steps}step_p{prompt_index:02d}_{slug(prompt)}_seed{seed}.png"


def sample_target(
    model: ModelUnderTest, target: Target, prompts: list[str], seeds: list[int], out: Path,
    guidance_scale: float, batch_size: int,
) -> list[dict]:
    """Every (prompt, seed) image of one model, through evaluate.generate_images, renamed readably."""
    resolution = target.resolution or model.unet.config.sample_size * vae_scale_factor(model.vae.config)
    factor = vae_scale_factor(model.vae.config)
    if resolution % factor:
        raise ConfigError(f"--resolution {resolution}: must be a multiple of {factor} (the VAE's downsampling).")
    pairs = [(index, prompt, seed) for index, prompt in enumerate(prompts) for seed in seeds]
    staging = out / f".staging-{uuid.uuid4().hex[:8]}"
    try:
        paths = generate_images(
            model, [prompt for _, prompt, _ in pairs], [seed for _, _, seed in pairs], target.steps,
            guidance_scale, resolution, staging, batch_size,
        )
        records = []
        for (index, prompt, seed), path in zip(pairs, paths):
            name = image_name(target, index, prompt, seed)
            os.replace(path, out / name)
            records.append({
                "file": name, "model": target.name, "source": str(target.path), "steps": target.steps,
                "prompt": prompt, "seed": seed, "resolution": resolution,
                "prediction_type": model.prediction_type, "guidance_scale": guidance_scale,
            })
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return records


def write_grid(records: list[dict], targets: list[Target], out: Path) -> Path:
    """grid.png: one row per model (name, steps), one column per (prompt, seed)."""
    from lightning_sdxl.callbacks.sample_grid import labelled_grid

    columns = list(dict.fromkeys((record["prompt"], record["seed"]) for record in records))
    by_key = {(record["model"], record["steps"], record["prompt"], record["seed"]): record["file"] for record in records}
    rows = []
    for target in targets:
        files = [by_key[(target.name, target.steps, *column)] for column in columns]
        images = [pil_to_tensor(Image.open(out / file).convert("RGB")) for file in files]
        rows.append(torch.stack(images).float() / 255)
    sizes = {row.shape[-1] for row in rows}
    if len(sizes) > 1:  # models sampled at different resolutions: the grid shows them at the smallest
        size = min(sizes)
        rows = [torch.nn.functional.interpolate(row, size=(size, size), mode="area") for row in rows]
    multi_seed = len({seed for _, seed in columns}) > 1
    grid = labelled_grid(
        rows,
        [f"{target.name}, {target.steps} step{'s' * (target.steps != 1)}" for target in targets],
        [f"{prompt} (seed {seed})" if multi_seed else prompt for prompt, seed in columns],
        max_cell=MAX_CELL,
    )
    with atomic_path(out / GRID_FILE) as temporary:
        grid.save(temporary, format="png")
    return out / GRID_FILE


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device {name}: {error}; give cuda, cuda:N or cpu.") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; give --device cpu.")
    return device


def sample(args: argparse.Namespace) -> Path:
    """Check everything, then load and sample each model in turn; returns the output folder."""
    prompts, seeds = read_prompts(args), seed_list(args)
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: give at least 1.")
    device = pick_device(args.device)
    targets = resolve_targets(args)  # every check before the first model loads
    out = Path(args.out or Path("outputs") / "samples" / datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for target in targets:
        print(f"{target.name}: {len(prompts) * len(seeds)} images, {target.steps} step(s)", file=sys.stderr)
        model = load_target(target, device)
        records += sample_target(model, target, prompts, seeds, out, args.guidance_scale, args.batch_size)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    with atomic_path(out / INDEX_FILE) as temporary:
        temporary.write_text(json.dumps(records, indent=2) + "\n")
    write_grid(records, targets, out)
    print(f"{len(records)} images and {GRID_FILE} in {out}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        sample(args)
    except ConfigError as error:  # includes missing paths: one line, no traceback
        print(f"Error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
