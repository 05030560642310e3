"""One training process per output folder: a second run started in the same folder stops at once
instead of replacing the first one's checkpoints and export (issue 15). The lock names the host
and process; a lock whose process is gone (a killed run) is taken over."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lightning.fabric.utilities.rank_zero import rank_zero_only

from lightning_sdxl.errors import ConfigError

LOCK_FILE = ".train.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(lock: Path) -> dict | None:
    """The live run holding `lock` ({"host", "pid"}), or None when absent or stale."""
    try:
        holder = json.loads(lock.read_text())
    except (FileNotFoundError, ValueError):
        return None
    same_host = holder.get("host") == socket.gethostname()
    if same_host and (holder.get("pid") == os.getpid() or not _alive(int(holder.get("pid", -1)))):
        return None
    return holder


def check_not_locked(output_dir: str | os.PathLike) -> None:
    """Raise ConfigError when a live run holds `output_dir` (rank 0; cheap, before models load)."""
    if rank_zero_only.rank != 0:
        return
    lock = Path(output_dir) / LOCK_FILE
    holder = _holder(lock)
    if holder is not None:
        raise ConfigError(
            f"{lock.parent} is in use by another training run (host {holder.get('host')}, pid {holder.get('pid')}): "
            f"give this run its own folder (hydra.run.dir=...), or remove {lock} if that run is gone."
        )


@contextmanager
def run_lock(output_dir: str | os.PathLike) -> Iterator[None]:
    """Hold `<output_dir>/.train.lock` while training (global rank 0; other ranks share its run).

    Raises:
        ConfigError: another live process (on this host, or any process on another host) holds it;
            a lock left on another host by a killed run must be removed by hand (the message names it).
    """
    if rank_zero_only.rank != 0:
        yield
        return
    lock = Path(output_dir) / LOCK_FILE
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:  # O_EXCL: of two runs started at once, one creates the lock, the other sees it
        try:
            handle = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            check_not_locked(output_dir)  # a live holder: ConfigError
            lock.unlink(missing_ok=True)  # a stale lock (its process is gone): take it over
    with os.fdopen(handle, "w") as file:
        json.dump({"host": socket.gethostname(), "pid": os.getpid()}, file)
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)
