"""One training run per output folder (issue 15: two runs in one folder both exited 0, one's
checkpoints and export replacing the other's)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from lightning_sdxl.errors import ConfigError
from lightning_sdxl.run_lock import LOCK_FILE, check_not_locked, run_lock


def test_a_live_run_holds_the_folder_and_a_dead_one_does_not(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": sleeper.pid}))
        with pytest.raises(ConfigError, match=f"in use by another training run .*pid {sleeper.pid}"):
            check_not_locked(tmp_path)
        with pytest.raises(ConfigError, match="hydra.run.dir"), run_lock(tmp_path):
            raise AssertionError("must not train")
    finally:
        sleeper.kill()
        sleeper.wait()
    # The holder is gone (a killed run): its stale lock is taken over, and released at the end.
    with run_lock(tmp_path):
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] != sleeper.pid
    assert not (tmp_path / LOCK_FILE).exists()


def test_another_host_holds_the_folder_until_its_lock_is_removed(tmp_path):
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "some-other-node", "pid": 1}))
    with pytest.raises(ConfigError, match="host some-other-node"):
        check_not_locked(tmp_path)
