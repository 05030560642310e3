"""The toy Table 2 along the whole recipe chain: python -m lightning_sdxl.toy.table2_recipe

Runs the progressive recipe on the committed toy teacher twice, with the paper's adversarial
losses and with loss=mse at every phase (the 128 to 32 MSE phase, identical in both, runs once),
then scores the teacher at 32 steps (CFG 6, as stage 128 to 32's teacher) and each arm's student
at 8, 4, 2 and 1 steps on the same prompts and seeds with the toy metric networks (FID-Whole,
FID-Patch on the 16 px native centre crop, CLIP score). Writes `<out>/table2.md` (also .json),
`<out>/grid.png` (rows: teacher, then each arm's 8, 4, 2, 1-step students; columns: prompts) and
the run time. Re-running the command reuses finished phases and generated images.

One run per arm and no repeats: a single training run's scores vary with its seed, so this table
cannot separate the arms; `python -m lightning_sdxl.toy.table2` is the seeded single-stage
comparison with confidence intervals.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torchvision.utils import make_grid, save_image

from lightning_sdxl import CONF_DIR
from lightning_sdxl.evaluate import GRID_PROMPTS, evaluate, load_images, markdown_table
from lightning_sdxl.io import atomic_path
from lightning_sdxl.recipe import DONE, recipe_phases, run_recipe
from lightning_sdxl.run_config import compose_train_config

log = logging.getLogger(__name__)
ARMS = ("adversarial", "mse")
STAGE_STEPS = {"32to8": 8, "8to4": 4, "4to2": 2, "2to1": 1}
TEACHER_STEPS, TEACHER_GUIDANCE = 32, 6.0


def run_arm(out: Path, arm: str, phase_steps: int, overrides: list[str]) -> dict[str, Path]:
    """Run one arm's recipe; returns each stage's final phase folder by stage name."""
    recipe_overrides = [
        "experiment=toy_recipe", f"recipe.adversarial={arm == 'adversarial'}",
        (
            f"recipe.phase_overrides=['steps={phase_steps}','validation.every_n_steps={phase_steps}',"
            f"'checkpoint.every_n_steps={phase_steps}']"
        ),
    ]
    cfg = compose_train_config(recipe_overrides + overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out / arm)
    phases = recipe_phases(cfg.recipe)
    if arm != ARMS[0]:  # the shared first phase (128 to 32, MSE) is the adversarial arm's
        first = f"00_{phases[0].name}"
        (out / arm).mkdir(parents=True, exist_ok=True)
        if not (out / arm / first).exists() and (out / ARMS[0] / first / DONE).exists():
            os.symlink((out / ARMS[0] / first).resolve(), out / arm / first)
    run_recipe(cfg, overrides)
    stage_ends = {}
    for index, phase in enumerate(phases):
        stage = phase.overrides[0].split("=", 1)[1]
        if phase.ends_stage and stage in STAGE_STEPS:
            stage_ends[stage] = out / arm / f"{index:02d}_{phase.name}"
    return stage_ends


def score(
    out: Path, name: str, target: list[str], steps: int, guidance: float, num_images: int, extra: list[str]
) -> tuple[dict, Path]:
    """eval.py on one model at one step count; returns its row and its image folder."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[
            "model=toy", "metrics=toy", f"steps={steps}", f"guidance_scale={guidance}",
            f"num_images={num_images}", "batch_size=64", f"target.name={name}", *target, *extra,
        ])
    folder = out / "eval" / name.replace(" ", "_")
    with open_dict(cfg):
        cfg.output_dir = str(folder)
    (row,) = evaluate(cfg)
    return row, folder / "images" / f"steps_{steps}"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/toy_table2_recipe"))
    parser.add_argument("--phase-steps", type=int, default=200, help="batches per recipe phase")
    parser.add_argument("--num-images", type=int, default=512, help="images per row (FID sample size)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every phase")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    started = time.perf_counter()

    stage_ends = {arm: run_arm(args.out, arm, args.phase_steps, args.overrides) for arm in ARMS}
    trained = time.perf_counter()
    # The base model (model.path=...) and metric settings also apply to scoring.
    shared = [o for o in args.overrides if o.startswith(("model.", "metrics."))]
    rows, image_folders = [], []
    row, images = score(
        args.out, "teacher", ["target.kind=teacher"], TEACHER_STEPS, TEACHER_GUIDANCE, args.num_images, shared
    )
    rows.append(row)
    image_folders.append(images)
    for arm in ARMS:
        for stage, steps in STAGE_STEPS.items():
            unet = stage_ends[arm][stage] / "export" / "unet"
            row, images = score(
                args.out, f"{arm} {stage}", ["target.kind=unet", f"target.path={unet.resolve()}"], steps, 0.0,
                args.num_images, shared,
            )
            rows.append({**row, "arm": arm})
            image_folders.append(images)
    finished = time.perf_counter()

    grid = torch.cat([next(load_images(sorted(f.glob("*.png"))[:GRID_PROMPTS], GRID_PROMPTS)) for f in image_folders])
    with atomic_path(args.out / "grid.png") as temporary:
        save_image(make_grid(grid, nrow=GRID_PROMPTS, padding=2), temporary, format="png")
    timing = {"training_s": round(trained - started), "evaluation_s": round(finished - trained),
              "total_s": round(finished - started), "threads": torch.get_num_threads()}
    lines = [
        *markdown_table(rows),
        "",
        (
            f"Recipe: {args.phase_steps} batches per phase; {args.num_images} images per row; "
            f"time {timing['total_s']} s ({timing['training_s']} s training, {timing['evaluation_s']} s scoring)."
        ),
    ]
    with atomic_path(args.out / "table2.md") as temporary:
        temporary.write_text("\n".join(lines) + "\n")
    with atomic_path(args.out / "table2.json") as temporary:
        temporary.write_text(json.dumps({"rows": rows, "timing": timing, "args": vars(args) | {"out": str(args.out)}}, indent=2))
    print("\n".join(lines))
    return args.out / "table2.md"


if __name__ == "__main__":
    main()
