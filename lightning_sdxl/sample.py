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
from datetime import datetime
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from lightning_sdxl.errors import ConfigError, MissingPathError
from lightning_sdxl.evaluate import ModelUnderTest, generate_images
from lightning_sdxl.io import atomic_path
from lightning_sdxl.models.vae import vae_scale_factor
from lightning_sdxl.sample_targets import MODEL_HELP, Target, load_target, resolve_targets

GRID_FILE, INDEX_FILE = "grid.png", "samples.json"
MAX_CELL = 512  # grid cells: larger images (SDXL's 1024 px) are shrunk; the PNGs keep full size


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
