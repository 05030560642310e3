"""Atomic writes: a crash mid-write never leaves a truncated checkpoint, export or image."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors.torch import save_file

from lightning_sdxl.errors import RefusedOverwrite

# Every folder `atomic_dir` writes holds this file; only such folders (or empty ones) are replaced.
OWNED_MARKER = ".lightning_sdxl"


def normal_permissions(path: str | os.PathLike) -> None:
    """Give a file the umask's permissions (0644 under umask 022): mkstemp and safetensors' writer
    create 0600 files, which teammates on a shared cluster could not read."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        normal_permissions(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def save_weights(
    state: dict[str, torch.Tensor], path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """A safetensors file of `state` (on the CPU, in `dtype` when given), written atomically."""
    tensors = {key: value.detach().to("cpu", dtype).contiguous() for key, value in state.items()}
    with atomic_path(path) as temporary:
        save_file(tensors, str(temporary), metadata={"format": "pt"})
    return Path(path)


def check_replaceable(path: str | os.PathLike) -> None:
    """Raise RefusedOverwrite unless `path` is absent, an empty folder or a folder this project
    wrote (it holds OWNED_MARKER, or an older export's export_info.json): an export never deletes
    a user's files."""
    path = Path(path)
    if not path.exists():
        return
    if not path.is_dir():
        raise RefusedOverwrite(f"{path} is a file, not an output folder; choose another output path.")
    # export_info.json: an export written before the marker existed (only this project writes it).
    if any(path.iterdir()) and not (path / OWNED_MARKER).is_file() and not (path / "export_info.json").is_file():
        raise RefusedOverwrite(
            f"{path} holds files lightning_sdxl did not write (no {OWNED_MARKER} marker), so it will not "
            "replace them; choose a new or empty folder, or move those files away first."
        )


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `path`; swap it in for `path` only if the block succeeds.

    `path` must be absent, empty or one of this project's own folders (`check_replaceable`, checked
    before the block runs and again before the swap); the new folder gets the OWNED_MARKER file.
    A previous folder at `path` is renamed aside, the new one renamed in, then the old one removed:
    `path` is at every moment either the complete old export or the complete new one (or, for an
    instant between the two renames, absent with the old one beside it as `.<name>.old-*`).
    """
    path = Path(path)
    check_replaceable(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.mkdir, not tempfile.mkdtemp: the export keeps the umask's permissions, not 0700.
    temporary = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    temporary.mkdir()
    try:
        yield temporary
        (temporary / OWNED_MARKER).write_text("Written by lightning_sdxl; a rerun may replace this folder.\n")
        for file in temporary.rglob("*"):
            if file.is_file() and not file.is_symlink():
                normal_permissions(file)
        check_replaceable(path)
        swap_into_place(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def swap_into_place(temporary: Path, path: Path) -> None:
    """Replace `path` (a file, a folder or nothing) by the complete `temporary` folder: the old one is
    renamed aside, the new one renamed in, then the old one removed."""
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    if path.exists():
        os.replace(path, old)
    os.replace(temporary, path)
    if old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old.exists():
        old.unlink()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint IO, written to a temporary file and renamed into place.

    Lightning writes checkpoints in place; an interrupted save would corrupt `last.ckpt`, the file
    a resume needs. Remote (fsspec) paths fall back to Lightning's own writer.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        if get_filesystem(path).protocol not in ("file", ("file", "local")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_path(path) as temporary:
            super().save_checkpoint(checkpoint, temporary, storage_options)
