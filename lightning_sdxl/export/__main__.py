"""python -m lightning_sdxl.export --checkpoint last.ckpt --out DIR: re-export a checkpoint's student
(the writers: lightning_sdxl/export/__init__.py)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from lightning_sdxl.export import export_student
from lightning_sdxl.module import DistillationModule


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    single_file: bool = True,
) -> Path:
    """Export a Lightning checkpoint of a `DistillationModule` (the frozen parts reload from its model_path)."""
    module = DistillationModule.for_inference(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    info = {"checkpoint": str(checkpoint), "global_step": saved["global_step"]}
    return export_student(module.eval(), out_dir, dtype, info, single_file)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_sdxl.export", description="Re-export a checkpoint's student (diffusers UNet and scheduler, LoRA, single file)."
    )
    parser.add_argument(
        "--checkpoint",
        required=True,
        help="a Lightning checkpoint, e.g. <run>/checkpoints/last.ckpt",
    )
    parser.add_argument("--out", required=True, help="the export folder (replaced atomically)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--single-file", action=argparse.BooleanOptionalAction, default=True,
        help="also write the all-in-one checkpoint (ComfyUI, A1111)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    export_checkpoint(args.checkpoint, args.out, getattr(torch, args.dtype), args.single_file)


if __name__ == "__main__":
    main()
