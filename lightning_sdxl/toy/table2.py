"""The toy Table 2 as a seeded comparison: python -m lightning_sdxl.toy.table2

Single distillation stages from ONE shared teacher (`model.path`, by default the committed toy
teacher), each an ordinary `train(cfg)` run (a LoRA student, as the recipe's phase (a)), per arm
and seed:

    arms    adversarial = loss=uncond_adv   mse = loss=mse   mse_adv = loss=mse_adv (MSE + lambda x adversarial)
    stages  4to2 (scored at 2 steps)        2to1 (scored at 1 step)
    seeds   0 .. --seeds - 1: `seed=s` also sets the toy data order (conf/data/toy.yaml seed: ${seed})

Every run is scored with `evaluate()` on the same held-out prompts and noise seeds: FID-Whole,
FID-Patch, CLIP score, precision and recall (FID-Whole's view), and here the high-frequency ratio
(`metrics/sharpness.py`: the student's images against the teacher's at the teacher's step count on
the same prompts and seeds; 1.0 = as sharp as the teacher) and the discriminator's final accuracy
(the mean of `discriminator/accuracy_real` and `_fake` over the last fifth of the run, read from its
`csv/metrics.csv`; a run within 0.5 +- CHANCE_BAND carried no adversarial signal). The teacher is
scored once per step count: at the students' step counts (the baseline every student must beat)
and at its own (the sharpness reference).

Per (stage, arm) cell: the mean over seeds and a 95 % Student-t confidence interval (n - 1 degrees
of freedom). Writes `<out>/table2.md`, `<out>/table2.json` (every per-seed number), `<out>/grid.png`
(per stage, rows: teacher at the student's steps, teacher at its own steps, each arm's first-seed
student; columns: the first 8 prompts) and the time taken. Runs live in `<out>/runs/<stage>_<arm>_seed<s>/`
and scorings in `<out>/eval/`; a rerun reuses finished runs (their `export/unet`) and scorings.
The whole-chain version (the progressive recipe, one run per arm) is `lightning_sdxl.toy.table2_recipe`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict
from torchvision.utils import make_grid, save_image

from lightning_sdxl import CONF_DIR
from lightning_sdxl.evaluate import GRID_PROMPTS, evaluate, load_images
from lightning_sdxl.io import atomic_path
from lightning_sdxl.metrics.sharpness import HighFrequencyRatio
from lightning_sdxl.module import CHANCE_BAND
from lightning_sdxl.recipe import stage_config
from lightning_sdxl.run_config import compose_train_config, override_key

log = logging.getLogger(__name__)
ARMS = {"adversarial": "uncond_adv", "mse": "mse", "mse_adv": "mse_adv"}  # arm -> loss
STAGES = ("4to2", "2to1")
# (key, column title, decimals); D accuracy is the cell's last column.
METRICS = (
    ("fid_whole", "FID-Whole", 2), ("fid_patch", "FID-Patch", 2), ("clip_score", "CLIP", 2),
    ("precision", "precision", 3), ("recall", "recall", 3), ("hf_ratio", "HF ratio", 3),
)
# Metric -> True where higher is better (the verdict against the teacher baseline).
HIGHER_IS_BETTER = {"fid_whole": False, "fid_patch": False, "clip_score": True, "precision": True, "recall": True}
EVAL_BATCH = 64
HARDEST_START = 999  # the start timestep whose jump is longest (pure noise): D's per-start column
RUN_TIME_FILE = "table2_train_time.json"
SCORE_FILE = "table2_score.json"
# Keys every run sets itself; pass-through overrides must not set them.
RUN_KEYS = {
    "seed", "stage", "loss", "steps", "output_dir", "ckpt_path", "recipe", "logger",
    "validation.every_n_steps", "checkpoint.every_n_steps", "trainer.log_every_n_steps",
}
SCORING_PREFIXES = ("model", "metrics", "data")  # pass-through overrides that scoring also takes

# Two-sided 95 % Student-t critical values t_{0.975, dof} for dof 1..30 (scipy.stats.t.ppf, 6
# decimals; tests/test_toy_table2.py checks them against scipy, a dev dependency only).
T_975 = (
    12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
    2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
    2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
)
Z_975 = 1.959963984540054


# ---------------------------------------------------------------------------------------------
# Statistics


def t_critical(dof: int) -> float:
    """t_{0.975, dof}: the table for dof <= 30, beyond it the Cornish-Fisher expansion of the t
    quantile in 1/dof (Abramowitz & Stegun 26.7.5; error below 1e-6 for dof > 30)."""
    if dof < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {dof}")
    if dof <= len(T_975):
        return T_975[dof - 1]
    z = Z_975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / dof + g2 / dof**2 + g3 / dof**3 + g4 / dof**4


def mean_ci(values: list[float | None]) -> dict:
    """Mean and 95 % confidence half-width (Student t, n - 1 dof) of the non-missing values.

    Returns {"mean", "half_width", "n"}; half_width is None for fewer than 2 values, mean for none.
    """
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(present)
    if n == 0:
        return {"mean": None, "half_width": None, "n": 0}
    mean = sum(present) / n
    if n < 2:
        return {"mean": mean, "half_width": None, "n": n}
    sd = math.sqrt(sum((v - mean) ** 2 for v in present) / (n - 1))
    return {"mean": mean, "half_width": t_critical(n - 1) * sd / math.sqrt(n), "n": n}


# ---------------------------------------------------------------------------------------------
# The discriminator's final accuracy


def metrics_csv(run: Path) -> Path:
    """The CSV logger's file of a run (logger=csv writes `<run>/csv/metrics.csv`)."""
    default = run / "csv" / "metrics.csv"
    return default if default.exists() else next(iter(sorted(run.rglob("metrics.csv"))), default)


def discriminator_accuracy(path: Path, fraction: float = 0.2, start: int | None = None) -> float | None:
    """Mean over the last `fraction` of the logged steps of (accuracy_real + accuracy_fake) / 2
    (`discriminator/accuracy_*` in a CSV log), or with `start` of D's accuracy on the samples whose
    jump started at that t (`discriminator/accuracy_from_t{start}`, logged where a batch had one);
    None without a discriminator (loss=mse) or a log."""
    if not path.exists():
        return None
    values = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if start is not None:
                value = row.get(f"discriminator/accuracy_from_t{start}")
                if value not in (None, ""):
                    values.append(float(value))
                continue
            real, fake = row.get("discriminator/accuracy_real"), row.get("discriminator/accuracy_fake")
            if real not in (None, "") and fake not in (None, ""):
                values.append((float(real) + float(fake)) / 2)
    if not values:
        return None
    last = values[-max(1, int(len(values) * fraction)):]
    return sum(last) / len(last)


def no_adversarial_signal(accuracy: float | None) -> bool:
    """A discriminator at chance (0.5 +- CHANCE_BAND) over the run's end gave the generator noise."""
    return accuracy is not None and abs(accuracy - 0.5) <= CHANCE_BAND


# ---------------------------------------------------------------------------------------------
# Training and scoring


def run_overrides(stage: str, arm: str, seed: int, steps: int) -> list[str]:
    """What each run sets itself (after the pass-through overrides, so these win)."""
    return [
        f"stage={stage}", f"loss={ARMS[arm]}", f"seed={seed}", f"steps={steps}",
        f"validation.every_n_steps={steps}", f"checkpoint.every_n_steps={steps}",
        "callbacks.export.single_file=false", "logger=csv", "trainer.log_every_n_steps=1",
    ]


def check_overrides(overrides: list[str]) -> None:
    clashes = [o for o in overrides if override_key(o) in RUN_KEYS and o != "logger=csv"]
    if clashes:
        raise SystemExit(
            f"table2: {clashes} are set per run by this command (--stages, --arms, --seeds, --phase-steps); "
            "drop them from the overrides."
        )
    if any(override_key(o) == "experiment" for o in overrides):
        # Scoring (eval.py's config) takes only model=, metrics= and data.* overrides: an experiment
        # would train on one world and score on another (the open world's text encoders are wider).
        raise SystemExit(
            "table2: give the world by its parts, which scoring takes too: e.g. model=toy_open "
            "metrics=toy_open data.world=open instead of experiment=toy_open."
        )


def run_name(stage: str, arm: str, seed: int) -> str:
    return f"{stage}_{arm}_seed{seed}"


def train_run(out: Path, stage: str, arm: str, seed: int, steps: int, overrides: list[str]) -> tuple[Path, bool]:
    """One training run (reused when its export/unet exists); returns its folder and whether it trained."""
    from lightning_sdxl.train import train  # Lightning is only needed to train

    run = out / "runs" / run_name(stage, arm, seed)
    if (run / "export" / "unet" / "config.json").exists():
        log.info("table2: %s is done, reused", run.name)
        return run, False
    if run.exists():  # an interrupted run: checkpoints are written at the end only, so start over
        shutil.rmtree(run)
    cfg = compose_train_config(list(overrides) + run_overrides(stage, arm, seed, steps))
    with open_dict(cfg):
        cfg.output_dir = str(run)
    log.info("table2: training %s", run.name)
    started, cpu = time.perf_counter(), time.process_time()
    train(cfg)
    (run / RUN_TIME_FILE).write_text(json.dumps({
        "train_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu, 1),
        "threads": torch.get_num_threads(),
    }))
    return run, True


def _stamp(path: Path) -> list:
    """What identifies a model's weights on disk (name, size, mtime of each weights file)."""
    files = sorted(path.rglob("*.safetensors")) if path.is_dir() else [path]
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.exists()]


def score(
    out: Path, name: str, target: list[str], steps: list[int], num_images: int, shared: list[str],
    weights: Path | None = None,
) -> tuple[list[dict], Path]:
    """evaluate() on one model at `steps` (guidance 0, as the stages sample); returns its rows and
    its folder (`images/steps_<n>/` inside, and SCORE_FILE with the rows and the time taken). Reused when the model, steps and settings are unchanged;
    otherwise the folder's images are removed first (they may belong to an older model)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=[
            "model=toy", "metrics=toy", f"steps=[{','.join(map(str, steps))}]", "guidance_scale=0",
            f"num_images={num_images}", f"batch_size={EVAL_BATCH}", f"target.name={name}", *target, *shared,
        ])
    folder = out / "eval" / name
    if weights is None and cfg.model.path is not None and Path(str(cfg.model.path)).is_dir():
        weights = Path(str(cfg.model.path)) / "unet"
    key = hashlib.sha256(json.dumps(
        {"target": target, "steps": steps, "num_images": num_images, "shared": shared,
         "weights": _stamp(weights) if weights else None}, sort_keys=True,
    ).encode()).hexdigest()
    record = folder / SCORE_FILE
    if record.exists() and json.loads(record.read_text()).get("key") == key:
        log.info("table2: %s is scored, reused", name)
        return json.loads(record.read_text())["rows"], folder
    if (folder / "images").exists():
        shutil.rmtree(folder / "images")
    with open_dict(cfg):
        cfg.output_dir = str(folder)
    started, cpu = time.perf_counter(), time.process_time()
    rows = evaluate(cfg)
    timing = {"score_s": round(time.perf_counter() - started, 1), "cpu_s": round(time.process_time() - cpu, 1)}
    with atomic_path(record) as temporary:
        temporary.write_text(json.dumps({"key": key, "rows": rows, "timing": timing}, indent=2))
    return rows, folder


def image_paths(folder: Path, steps: int, count: int) -> list[Path]:
    return [folder / "images" / f"steps_{steps}" / f"{index:06d}.png" for index in range(count)]


def hf_ratio(images: list[Path], references: list[Path]) -> float:
    """High-frequency energy of `images` over that of `references` (pairs: same prompt and seed)."""
    metric = HighFrequencyRatio()
    for batch, reference in zip(load_images(images, EVAL_BATCH), load_images(references, EVAL_BATCH)):
        metric.update(batch, reference)
    return float(metric.compute())


# ---------------------------------------------------------------------------------------------
# The table


def _fmt(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _fmt_ci(stats: dict, digits: int) -> str:
    if stats["mean"] is None:
        return ""
    if stats["half_width"] is None:
        return _fmt(stats["mean"], digits)
    return f"{stats['mean']:.{digits}f} ± {stats['half_width']:.{digits}f}"


def verdict(stats: dict, baseline: float | None, higher_is_better: bool) -> str:
    """better / worse when the whole 95 % interval lies on one side of the baseline, else n.s."""
    if stats["half_width"] is None or baseline is None:
        return ""
    low, high = stats["mean"] - stats["half_width"], stats["mean"] + stats["half_width"]
    if low > baseline:
        return "better" if higher_is_better else "worse"
    if high < baseline:
        return "worse" if higher_is_better else "better"
    return "n.s."


def markdown(result: dict) -> list[str]:
    """table2.md: the cell means ± 95 % half-widths with the teacher rows, the verdicts against the
    teacher at the same steps, and every run."""
    titles = [title for _, title, _ in METRICS]
    header = ["stage", "arm", "steps", "seeds", *titles, "D accuracy", f"D acc. t={HARDEST_START}", "no signal"]
    lines = ["| " + " | ".join(header) + " |", "| --- | --- | " + " | ".join(["---:"] * (len(header) - 2)) + " |"]
    for stage in result["settings"]["stages"]:
        for row in (r for r in result["teacher"] if r["stage"] == stage):
            cells = [_fmt(row.get(key), digits) for key, _, digits in METRICS]
            lines.append(f"| {stage} | {row['role']} | {row['steps']} | | " + " | ".join(cells) + " | | | |")
        for cell in (c for c in result["cells"] if c["stage"] == stage):
            cells = [_fmt_ci(cell["metrics"][key], digits) for key, _, digits in METRICS]
            d = cell["metrics"]["d_accuracy"]
            flagged = f"{len(cell['no_signal_seeds'])}/{d['n']}" if d["n"] else ""
            lines.append(
                f"| {stage} | {cell['arm']} | {cell['steps']} | {cell['seeds']} | " + " | ".join(cells)
                + f" | {_fmt_ci(d, 3)} | {_fmt_ci(cell['metrics']['d_accuracy_t999'], 3)} | {flagged} |"
            )
    keys = list(HIGHER_IS_BETTER)
    lines += [
        "",
        (
            "Against the teacher at the same steps (the baseline): better / worse when the 95 % interval "
            "excludes the baseline's value, n.s. otherwise."
        ),
        "",
        "| stage | arm | steps | " + " | ".join(t for k, t, _ in METRICS if k in keys) + " |",
        "| --- | --- | ---: | " + " | ".join(["---"] * len(keys)) + " |",
    ]
    for cell in result["cells"]:
        baseline = next(r for r in result["teacher"] if r["stage"] == cell["stage"] and r["role"] == "teacher (baseline)")
        marks = [verdict(cell["metrics"][k], baseline.get(k), HIGHER_IS_BETTER[k]) for k in keys]
        lines.append(f"| {cell['stage']} | {cell['arm']} | {cell['steps']} | " + " | ".join(marks) + " |")
    lines += [
        "",
        "| run | steps | " + " | ".join(titles) + f" | D accuracy | D acc. t={HARDEST_START} | signal | train s |",
        "| --- | ---: | " + " | ".join(["---:"] * (len(titles) + 4)) + " |",
    ]
    for run in result["runs"]:
        cells = [_fmt(run.get(key), digits) for key, _, digits in METRICS]
        signal = "" if run["d_accuracy"] is None else ("no adversarial signal" if run["no_signal"] else "yes")
        lines.append(
            f"| {run['run']} | {run['steps']} | " + " | ".join(cells)
            + f" | {_fmt(run['d_accuracy'], 3)} | {_fmt(run.get('d_accuracy_t999'), 3)} | {signal}"
            + f" | {_fmt(run.get('train_s'), 0)} |"
        )
    timing, settings = result["timing"], result["settings"]
    lines += [
        "",
        (
            f"{settings['seeds']} seeds per arm, {settings['phase_steps']} batches per run, "
            f"{settings['num_images']} images per score; mean ± 95 % Student-t half-width over seeds. "
            "HF ratio: high-frequency energy against the teacher at its own steps (1 = as sharp). "
            f"D accuracy: the last fifth of the run, over all samples and over those whose jump started at "
            f"t = {HARDEST_START} (the only start where the student is far from the teacher, docs/MEASUREMENTS.md); "
            f"no signal: runs whose overall accuracy stayed within 0.5 ± {CHANCE_BAND}. "
            f"This invocation: {timing['total_s']} s ({timing['training_s']} s training {timing['runs_trained']} "
            f"runs, {timing['runs_reused']} reused; {timing['scoring_s']} s scoring; {timing['threads']} threads); "
            f"all runs' training {timing['all_runs_train_s']} s, all scoring {timing['all_scores_s']} s."
        ),
        "",
        "grid.png rows: " + "; ".join(result["grid_rows"]) + ".",
    ]
    return lines


def parse_list(choices) -> callable:
    def parse(text: str) -> list[str]:
        items = [item for item in text.split(",") if item]
        unknown = [item for item in items if item not in choices]
        if unknown or not items:
            raise argparse.ArgumentTypeError(f"{text}: a comma-separated list of {', '.join(choices)}")
        return items

    return parse


def distillation_stages() -> list[str]:
    names = sorted(p.stem for p in (Path(CONF_DIR) / "stage").glob("*.yaml"))
    return [n for n in names if (c := stage_config(n)).get("student_steps") and c.student_steps < c.teacher_steps]


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/toy_table2"))
    parser.add_argument("--stages", type=parse_list(distillation_stages()), default=list(STAGES),
                        help="comma-separated stages (default: 4to2,2to1)")
    parser.add_argument("--arms", type=parse_list(list(ARMS)), default=list(ARMS),
                        help="comma-separated arms (default: adversarial,mse,mse_adv)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per arm (default 5)")
    parser.add_argument("--phase-steps", type=int, default=400, help="batches per run (default 400, experiment=toy's steps)")
    parser.add_argument("--num-images", type=int, default=512, help="prompts per score (FID sample size)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides for every run (model./metrics./data. ones also score)")
    args = parser.parse_args(argv)
    if args.seeds < 1 or args.phase_steps < 1:
        parser.error("--seeds and --phase-steps must be positive")
    check_overrides(args.overrides)
    logging.basicConfig(level=logging.INFO)
    out, seeds = args.out, list(range(args.seeds))
    steps = {stage: (stage_config(stage).teacher_steps, stage_config(stage).student_steps) for stage in args.stages}
    started = time.perf_counter()

    # Seed-major: an interrupted command has whole seeds to show.
    runs, trained_now = {}, []
    for seed in seeds:
        for stage in args.stages:
            for arm in args.arms:
                runs[stage, arm, seed], fresh = train_run(out, stage, arm, seed, args.phase_steps, args.overrides)
                if fresh:
                    trained_now.append(runs[stage, arm, seed].name)
    trained = time.perf_counter()

    shared = [o for o in args.overrides if override_key(o).split(".", 1)[0].split("/", 1)[0] in SCORING_PREFIXES]
    teacher_steps = sorted({n for pair in steps.values() for n in pair})
    teacher_rows, teacher_folder = score(out, "teacher", ["target.kind=teacher"], teacher_steps, args.num_images, shared)
    teacher_by_steps = {row["steps"]: row for row in teacher_rows}
    scored_teacher = time.perf_counter()
    teacher, cells, per_run, grid_rows, grid = [], [], [], [], []
    columns = min(GRID_PROMPTS, args.num_images)
    for stage, (source, target) in steps.items():
        reference = image_paths(teacher_folder, source, args.num_images)
        for role, n in (("teacher (baseline)", target), ("teacher (reference)", source)):
            row = dict(teacher_by_steps[n], stage=stage, role=role)
            row["hf_ratio"] = hf_ratio(image_paths(teacher_folder, n, args.num_images), reference)
            teacher.append(row)
            grid_rows.append(f"{stage} teacher {n} steps")
            grid.append(next(load_images(image_paths(teacher_folder, n, columns), columns)))
        for arm in args.arms:
            values = []
            for seed in seeds:
                run = runs[stage, arm, seed]
                unet = run / "export" / "unet"
                (row,), folder = score(
                    out, run.name, ["target.kind=unet", f"target.path={unet.resolve()}"], [target],
                    args.num_images, shared, weights=unet,
                )
                adversarial = ARMS[arm] != "mse"
                accuracy = discriminator_accuracy(metrics_csv(run)) if adversarial else None
                accuracy_t999 = discriminator_accuracy(metrics_csv(run), start=HARDEST_START) if adversarial else None
                time_file = run / RUN_TIME_FILE
                trained_in = json.loads(time_file.read_text()) if time_file.exists() else {}
                values.append(dict(
                    row, run=run.name, stage=stage, arm=arm, loss=ARMS[arm], seed=seed,
                    hf_ratio=hf_ratio(image_paths(folder, target, args.num_images), reference),
                    d_accuracy=accuracy, d_accuracy_t999=accuracy_t999, no_signal=no_adversarial_signal(accuracy),
                    train_s=trained_in.get("train_s"), train_cpu_s=trained_in.get("cpu_s"),
                    score_s=json.loads((folder / SCORE_FILE).read_text()).get("timing", {}).get("score_s"),
                ))
                if seed == seeds[0]:
                    grid_rows.append(f"{stage} {arm} seed {seed} ({target} steps)")
                    grid.append(next(load_images(image_paths(folder, target, columns), columns)))
            per_run += values
            metrics = {key: {**mean_ci([v[key] for v in values]), "values": [v[key] for v in values]}
                       for key, _, _ in METRICS}
            for key in ("d_accuracy", "d_accuracy_t999"):
                metrics[key] = {**mean_ci([v[key] for v in values]), "values": [v[key] for v in values]}
            cells.append({
                "stage": stage, "arm": arm, "loss": ARMS[arm], "steps": target, "teacher_steps": source,
                "seeds": len(values), "metrics": metrics,
                "no_signal_seeds": [v["seed"] for v in values if v["no_signal"]],
            })
    finished = time.perf_counter()

    with atomic_path(out / "grid.png") as temporary:
        save_image(make_grid(torch.cat(grid), nrow=columns, padding=2), temporary, format="png")
    train_times = [r["train_s"] for r in per_run if r["train_s"] is not None]
    score_times = [r["score_s"] for r in per_run if r["score_s"] is not None]
    teacher_record = json.loads((teacher_folder / SCORE_FILE).read_text()).get("timing", {})
    timing = {
        "training_s": round(trained - started), "scoring_s": round(finished - trained),
        "teacher_scoring_s": round(scored_teacher - trained), "total_s": round(finished - started),
        "runs_trained": len(trained_now), "runs_reused": len(runs) - len(trained_now),
        "mean_train_s_per_run": round(sum(train_times) / len(train_times), 1) if train_times else None,
        # What the table cost over all invocations (each run's and scoring's recorded time).
        "all_runs_train_s": round(sum(train_times)), "all_scores_s": round(sum(score_times) + teacher_record.get("score_s", 0)),
        "threads": torch.get_num_threads(),
    }
    result = {
        "settings": {
            "out": str(out), "stages": args.stages, "arms": {arm: ARMS[arm] for arm in args.arms}, "seeds": args.seeds,
            "phase_steps": args.phase_steps, "num_images": args.num_images, "overrides": args.overrides,
            "scoring_overrides": shared, "confidence": 0.95, "chance_band": CHANCE_BAND,
        },
        "teacher": teacher, "cells": cells, "runs": per_run,
        "grid_rows": grid_rows, "timing": timing,
    }
    lines = markdown(result)
    with atomic_path(out / "table2.md") as temporary:
        temporary.write_text("\n".join(lines) + "\n")
    with atomic_path(out / "table2.json") as temporary:
        temporary.write_text(json.dumps(result, indent=2))
    print("\n".join(lines))
    return out / "table2.md"


if __name__ == "__main__":
    main()
