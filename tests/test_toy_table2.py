"""The toy Table 2 command end to end, at 2 batches per phase and 8 images per row (slow)."""

from __future__ import annotations

import json
import math

import pytest

from lightning_sdxl.toy import table2


@pytest.mark.slow
def test_table2_command_writes_the_table_and_grid(tmp_path):
    out = tmp_path / "table2"
    table2.main([
        "--out", str(out), "--phase-steps", "2", "--num-images", "8",
        "trainer.enable_progress_bar=false", "logger=csv", f"metrics.cache_dir={tmp_path / 'stats'}",
    ])
    result = json.loads((out / "table2.json").read_text())
    models = [row["model"] for row in result["rows"]]
    assert models == ["teacher"] + [f"{arm} {stage}" for arm in table2.ARMS for stage in table2.STAGE_STEPS]
    assert [row["steps"] for row in result["rows"]] == [32] + [8, 4, 2, 1] * 2
    assert all(math.isfinite(row[k]) for row in result["rows"] for k in ("fid_whole", "fid_patch", "clip_score"))
    assert (out / "grid.png").exists() and "| teacher | 32 |" in (out / "table2.md").read_text()
    # The shared 128 to 32 MSE phase ran once: the MSE arm links the adversarial arm's.
    assert (out / "mse" / "00_128to32_mse").is_symlink()
