"""What a finished stage leaves for the next and for users: `teacher/` (a diffusers SDXL folder),
`base_lora/` (the stage's model as a LoRA on the base) and `<output_dir>/releases.json` (a TSCD
chain's: one LoRA on the base for every step count)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from huggingface_hub import snapshot_download

from lightning_sdxl.export import (
    INFO_FILE,
    KOHYA_FILE,
    LORA_FILE,
    SCHEDULER_DIR,
    SINGLE_FILE,
    UNET_DIR,
)
from lightning_sdxl.io import atomic_dir, atomic_path
from lightning_sdxl.lora_extract import extract_to_folder

DONE = "DONE"  # a finished phase's marker
BASE_LORA_DIR, RELEASES_FILE = "base_lora", "releases.json"


def local_model_folder(path: Path) -> Path:
    """A local folder, or a hub id's cached snapshot (the first phase's loading has fetched it)."""
    if path.is_dir():
        return path
    return Path(snapshot_download(str(path), local_files_only=True))


def assemble_teacher(base: Path, export: Path, out: Path) -> Path:
    """A diffusers SDXL folder: the base's components (symlinked) with the export's UNet and scheduler."""
    if (out / "model_index.json").exists():
        return out
    with atomic_dir(out) as staging:
        for entry in local_model_folder(base).iterdir():
            if entry.name not in ("unet", "scheduler"):
                os.symlink(entry.resolve(), staging / entry.name)
        shutil.copytree(export / "unet", staging / "unet")
        shutil.copytree(export / "scheduler", staging / "scheduler")
    return out


def finish_stage(base: Path, phase_dir: Path, lora_rank: int | None) -> None:
    """A finished stage's products: `teacher/` (the next stage's teacher) and, with a rank, the LoRA
    that puts the stage's model on the base (`base_lora/`, lora_extract.py)."""
    assemble_teacher(base, phase_dir / "export", phase_dir / "teacher")
    if lora_rank and not (phase_dir / BASE_LORA_DIR / INFO_FILE).exists():
        extract_to_folder(str(base), str(phase_dir / "export" / UNET_DIR), phase_dir / BASE_LORA_DIR, lora_rank)


def write_releases(root: Path, releases: dict[int, Path]) -> Path:
    """`releases.json`: for each step count the files users ship (the paper's released set)."""
    entries = {}
    for steps, phase_dir in sorted(releases.items(), reverse=True):
        export, lora = phase_dir / "export", phase_dir / BASE_LORA_DIR
        info = json.loads((export / INFO_FILE).read_text())
        entry = {
            "num_inference_steps": steps, "guidance_scale": 0.0, "prediction_type": info["prediction_type"],
            "pipeline": str(phase_dir / "teacher"), "unet": str(export / UNET_DIR),
            "scheduler": str(export / SCHEDULER_DIR),
        }
        if (export / SINGLE_FILE).exists():
            entry["single_file"] = str(export / SINGLE_FILE)
        if (lora / LORA_FILE).exists():  # on the base model; an x0 LoRA also needs the x0 scheduler
            entry.update(lora=str(lora / LORA_FILE), lora_kohya=str(lora / KOHYA_FILE))
        entries[f"{steps}step"] = entry
    return _write_releases_file(root, entries)


def _write_releases_file(root: Path, entries: dict) -> Path:
    with atomic_path(root / RELEASES_FILE) as temporary:
        temporary.write_text(json.dumps(entries, indent=2) + "\n")
    return root / RELEASES_FILE


def write_lora_releases(root: Path, export: Path, base: Path, step_counts) -> Path:
    """`releases.json` of a TSCD chain (METHOD.md 7): the last phase's LoRA, trained on the base
    model itself, for every step count, with the schedulers Hyper-SD's users take (TCD, whose k-step
    grid in diffusers 0.42 is the trailing grid the segments end on, or the export's trailing Euler)."""
    info = json.loads((export / INFO_FILE).read_text())
    entries = {  # no "pipeline": the base model's folder holds the base UNet, not this model
        f"{steps}step": {
            "num_inference_steps": steps, "guidance_scale": 0.0, "prediction_type": info["prediction_type"],
            "base_model": str(base), "lora": str(export / LORA_FILE), "lora_kohya": str(export / KOHYA_FILE),
            "unet": str(export / UNET_DIR), "scheduler": str(export / SCHEDULER_DIR),
            "tcd_scheduler": "TCDScheduler.from_config(pipe.scheduler.config)",
        }
        for steps in sorted(step_counts, reverse=True)
    }
    return _write_releases_file(root, entries)
