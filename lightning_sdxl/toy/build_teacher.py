"""Regenerate the committed toy teacher: python -m lightning_sdxl.toy.build_teacher [--steps N] ...

1. The toy SDXL architecture (`build_toy_sdxl`, seed 0) with its VAE trained on toy images
   (`lightning_sdxl.toy.autoencoder`), written as `<work-dir>/init` (a diffusers SDXL folder).
2. `python train.py experiment=toy_teacher model.path=<work-dir>/init`: the UNet and text
   encoders trained by the project's Lightning path (experiment=toy_teacher), run folder `<work-dir>/teacher`;
   an interrupted run resumes from its last checkpoint when the command is repeated.
3. The run's float16 export copied to `--out` (lightning_sdxl/assets/toy-sdxl), atomically.

Deterministic for a given machine and thread count (seeded data, noise and initialisation).
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

import torch
from omegaconf import open_dict

from lightning_sdxl import ASSETS_DIR
from lightning_sdxl.data.toy_world import WORLDS, ToyWorld
from lightning_sdxl.io import atomic_dir
from lightning_sdxl.models.tiny import TOY_RESOLUTION, build_toy_sdxl
from lightning_sdxl.run_config import compose_train_config
from lightning_sdxl.toy.autoencoder import train_autoencoder
from lightning_sdxl.train import train

log = logging.getLogger(__name__)


def build_initial_pipeline(folder: Path, vae_steps: int, seed: int = 0, world: str = "simple") -> Path:
    """Step 1: the random toy SDXL with a VAE trained on `world`, as a diffusers folder (skipped if present)."""
    if (folder / "model_index.json").exists():
        return folder
    pipeline = build_toy_sdxl(seed)
    world = ToyWorld(TOY_RESOLUTION, seed=seed, world=world)
    pipeline.vae = train_autoencoder(pipeline.vae, world, vae_steps, seed=seed)
    with atomic_dir(folder) as staging:
        pipeline.save_pretrained(staging, safe_serialization=True)
    return folder


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default="simple", choices=sorted(WORLDS), help="the toy world to learn")
    parser.add_argument("--out", type=Path, default=None, help="the teacher folder to write "
                        "(default: assets/toy-sdxl for the simple world, assets/toy-sdxl-<world> otherwise)")
    parser.add_argument("--work-dir", type=Path, default=None, help="VAE, run folder, checkpoints "
                        "(default: outputs/toy_teacher[_<world>])")
    parser.add_argument("--vae-steps", type=int, default=1200, help="VAE training batches (32 images each)")
    parser.add_argument("--steps", type=int, default=None, help="UNet batches (default: experiment=toy_teacher's)")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides, e.g. trainer.devices=2")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    torch.set_float32_matmul_precision("high")

    suffix = "" if args.world == "simple" else f"-{args.world}"
    out = args.out or ASSETS_DIR / f"toy-sdxl{suffix}"
    work_dir = args.work_dir or Path(f"outputs/toy_teacher{suffix.replace('-', '_')}")
    init = build_initial_pipeline(work_dir / "init", args.vae_steps, world=args.world)
    run_dir = work_dir / "teacher"
    overrides = ["experiment=toy_teacher", f"model.path={init.resolve()}", f"data.world={args.world}", *args.overrides]
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    if (run_dir / "checkpoints" / "last.ckpt").exists():
        overrides.append("ckpt_path=last")
    cfg = compose_train_config(overrides)
    with open_dict(cfg):
        cfg.output_dir = str(run_dir)
    train(cfg)
    with atomic_dir(out) as staging:
        shutil.copytree(run_dir / "export", staging, dirs_exist_ok=True)
    log.info("Toy teacher written to %s", out)
    return out


if __name__ == "__main__":
    main()
