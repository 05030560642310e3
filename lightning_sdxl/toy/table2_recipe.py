"""The toy Table 2 along the whole recipe chain: python -m lightning_sdxl.toy.table2_recipe

Runs the progressive recipe on the committed toy teacher twice, with the paper's adversarial
losses and with loss=mse at every phase (the 128 to 32 MSE phase, identical in both, runs once),
and Hyper-SD's TSCD chain (`experiment=toy_hypersd`: one LoRA through k = 8, 4, 2, 1 segments from
the same teacher, at its CFG 6 and 32-step grid), then scores the teacher at 32 steps (CFG 6, as
stage 128 to 32's teacher), each progressive arm's student at 8, 4, 2 and 1 steps and the TSCD
chain's one final LoRA at 8, 4, 2 and 1 steps, on the same prompts and seeds with the toy metric
networks (FID-Whole, FID-Patch on the 16 px native centre crop, CLIP score). Writes
`<out>/table2.md` (also .json), `<out>/grid.png` (rows: teacher, then each arm's 8, 4, 2, 1-step
models; columns: prompts) and the run time of each arm's training. Re-running the command reuses
finished phases (and their recorded training time) and generated images; `--arms` picks arms.

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
ARMS = ("adversarial", "mse", "tscd")
STAGE_STEPS = {"32to8": 8, "8to4": 4, "4to2": 2, "2to1": 1}
TSCD_STEPS = (8, 4, 2, 1)  # the TSCD chain's one LoRA, scored at each
ARM_TIME_FILE = "arm_train_time.json"
TEACHER_STEPS, TEACHER_GUIDANCE = 32, 6.0


def run_arm(out: Path, arm: str, phase_steps: int, overrides: list[str]) -> dict[str, Path]:
    """Run one arm's recipe; returns the export folder each row scores, by row name (the
    progressive arms': each stage's final phase; TSCD's: its last phase, at every step count).
    The arm's training time is kept in `<out>/<arm>/arm_train_time.json` (a rerun that trains
    nothing keeps the first figure)."""
    started = time.perf_counter()
    experiment = ["experiment=toy_hypersd"] if arm == "tscd" else [
        "experiment=toy_recipe", f"recipe.adversarial={arm == 'adversarial'}"]
    recipe_overrides = [
        *experiment,
        (
            f"recipe.phase_overrides=['steps={phase_steps}','validation.every_n_steps={phase_steps}',"
            f"'checkpoint.every_n_steps={phase_steps}']"
        ),
    ]
    cfg = compose_train_config(recipe_overrides + overrides)
    with open_dict(cfg):
        cfg.output_dir = str(out / arm)
    phases = recipe_phases(cfg.recipe)
    if arm == "mse":  # the shared first phase (128 to 32, MSE) is the adversarial arm's
        first = f"00_{phases[0].name}"
        (out / arm).mkdir(parents=True, exist_ok=True)
        if not (out / arm / first).exists() and (out / ARMS[0] / first / DONE).exists():
            os.symlink((out / ARMS[0] / first).resolve(), out / arm / first)
    done = [(out / arm / f"{index:02d}_{phase.name}" / DONE).exists() for index, phase in enumerate(phases)]
    export = run_recipe(cfg, overrides)
    record = out / arm / ARM_TIME_FILE
    if not (all(done) and record.exists()):  # a partial earlier run: this figure is the remainder only
        with atomic_path(record) as temporary:
            temporary.write_text(json.dumps({"training_s": round(time.perf_counter() - started), "resumed": any(done)}))
    if arm == "tscd":
        return {"tscd LoRA": export}
    stage_ends = {}
    for index, phase in enumerate(phases):
        stage = phase.overrides[0].split("=", 1)[1]
        if phase.ends_stage and stage in STAGE_STEPS:
            stage_ends[f"{arm} {stage}"] = out / arm / f"{index:02d}_{phase.name}" / "export"
    return stage_ends


def arm_rows(arm: str, exports: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(row name, eval target overrides, steps) per row of an arm."""
    if arm == "tscd":
        ((name, export),) = exports.items()
        target = ["target.kind=lora", f"target.path={(export / 'lora.safetensors').resolve()}"]
        return [(name, target, steps) for steps in TSCD_STEPS]
    return [
        (name, ["target.kind=unet", f"target.path={(export / 'unet').resolve()}"], STAGE_STEPS[name.split()[-1]])
        for name, export in exports.items()
    ]


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
    parser.add_argument("--arms", type=lambda text: text.split(","), default=list(ARMS),
                        help=f"comma-separated arms (default {','.join(ARMS)})")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every phase")
    args = parser.parse_args(argv)
    if unknown := set(args.arms) - set(ARMS):
        parser.error(f"--arms: {', '.join(sorted(unknown))} unknown; choose from {', '.join(ARMS)}")
    if "mse" in args.arms and "adversarial" not in args.arms:
        parser.error("--arms: the mse arm reuses the adversarial arm's first phase; add adversarial")
    logging.basicConfig(level=logging.INFO)
    started = time.perf_counter()

    exports = {arm: run_arm(args.out, arm, args.phase_steps, args.overrides) for arm in args.arms}
    arm_times = {arm: json.loads((args.out / arm / ARM_TIME_FILE).read_text()) for arm in args.arms}
    trained = time.perf_counter()
    # The base model (model.path=...) and metric settings also apply to scoring.
    shared = [o for o in args.overrides if o.startswith(("model.", "metrics."))]
    rows, image_folders = [], []
    row, images = score(
        args.out, "teacher", ["target.kind=teacher"], TEACHER_STEPS, TEACHER_GUIDANCE, args.num_images, shared
    )
    rows.append(row)
    image_folders.append(images)
    for arm in args.arms:
        for name, target, steps in arm_rows(arm, exports[arm]):
            row, images = score(args.out, name, target, steps, 0.0, args.num_images, shared)
            rows.append({**row, "arm": arm})
            image_folders.append(images)
    finished = time.perf_counter()

    grid = torch.cat([next(load_images(sorted(f.glob("*.png"))[:GRID_PROMPTS], GRID_PROMPTS)) for f in image_folders])
    with atomic_path(args.out / "grid.png") as temporary:
        save_image(make_grid(grid, nrow=GRID_PROMPTS, padding=2), temporary, format="png")
    timing = {"training_s": round(trained - started), "evaluation_s": round(finished - trained),
              "total_s": round(finished - started), "threads": torch.get_num_threads(), "arms": arm_times}
    lines = [
        *markdown_table(rows),
        "",
        (
            f"Recipe: {args.phase_steps} batches per phase; {args.num_images} images per row; "
            f"this command {timing['total_s']} s ({timing['training_s']} s training, {timing['evaluation_s']} s scoring)."
        ),
        "Training time per arm (as first trained; " + f"{timing['threads']} torch threads): "
        + "; ".join(f"{arm} {t['training_s']} s" + (" (phases finished before, e.g. a shared first phase, not counted)" if t.get("resumed") else "") for arm, t in arm_times.items()) + ".",
    ]
    with atomic_path(args.out / "table2.md") as temporary:
        temporary.write_text("\n".join(lines) + "\n")
    with atomic_path(args.out / "table2.json") as temporary:
        temporary.write_text(json.dumps({"rows": rows, "timing": timing, "args": vars(args) | {"out": str(args.out)}}, indent=2))
    print("\n".join(lines))
    return args.out / "table2.md"


if __name__ == "__main__":
    main()
