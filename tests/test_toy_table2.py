"""The toy Table 2: the seeded single-stage comparison (statistics, the discriminator-accuracy reader,
the command end to end) and the whole-recipe command (slow)."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from lightning_sdxl.toy import table2, table2_recipe


@pytest.mark.parametrize("dof", [*range(1, 31), 31, 35, 50, 120, 1000])
def test_t_critical_matches_scipy(dof):
    assert table2.t_critical(dof) == pytest.approx(stats.t.ppf(0.975, dof), abs=1e-6)


@pytest.mark.parametrize("values", [[1.0, 2.0], [3.1, 2.7, 2.9, 3.6, 3.3], [0.5] * 3 + [0.9] * 4, list(range(40))])
def test_mean_ci_matches_scipy(values):
    result = table2.mean_ci(values)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert result["n"] == len(values)
    assert result["mean"] == pytest.approx((low + high) / 2, rel=1e-12)
    assert result["half_width"] == pytest.approx((high - low) / 2, rel=1e-6)


def test_mean_ci_skips_missing_values_and_needs_two_for_an_interval():
    assert table2.mean_ci([None, 2.0, float("nan"), 4.0]) == pytest.approx(
        {"mean": 3.0, "half_width": table2.t_critical(1) * math.sqrt(2) / math.sqrt(2), "n": 2}
    )
    assert table2.mean_ci([5.0]) == {"mean": 5.0, "half_width": None, "n": 1}
    assert table2.mean_ci([None]) == {"mean": None, "half_width": None, "n": 0}
    with pytest.raises(ValueError):
        table2.t_critical(0)


def test_verdict_needs_the_whole_interval_beyond_the_baseline():
    cell = {"mean": 10.0, "half_width": 1.0, "n": 5}
    assert table2.verdict(cell, 12.0, higher_is_better=False) == "better"  # FID below the baseline
    assert table2.verdict(cell, 8.0, higher_is_better=False) == "worse"
    assert table2.verdict(cell, 8.0, higher_is_better=True) == "better"
    assert table2.verdict(cell, 10.5, higher_is_better=True) == "n.s."
    assert table2.verdict({"mean": 10.0, "half_width": None, "n": 1}, 8.0, higher_is_better=True) == ""


def test_discriminator_accuracy_is_the_mean_over_the_last_fifth(tmp_path):
    # As Lightning's CSVLogger writes it: one row per logged step, validation rows without accuracies.
    header = "discriminator/accuracy_fake,discriminator/accuracy_real,epoch,loss/generator,step,val/latent_mse_to_teacher"
    rows = [f"{0.1 * k:.1f},{1.0 - 0.05 * k:.2f},0,0.7,{k}," for k in range(10)]
    rows.insert(5, ",,0,,5,0.01")
    (tmp_path / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
    # 10 logged accuracies: the last fifth is steps 8 and 9.
    expected = ((0.8 + 0.60) / 2 + (0.9 + 0.55) / 2) / 2
    assert table2.discriminator_accuracy(tmp_path / "metrics.csv") == pytest.approx(expected)
    assert table2.discriminator_accuracy(tmp_path / "metrics.csv", fraction=1.0) == pytest.approx(
        sum((0.1 * k + 1.0 - 0.05 * k) / 2 for k in range(10)) / 10
    )
    # loss=mse logs no discriminator; a missing log reads as no accuracy either.
    (tmp_path / "mse.csv").write_text("epoch,loss/generator,step\n0,0.5,0\n0,0.4,1\n")
    assert table2.discriminator_accuracy(tmp_path / "mse.csv") is None
    assert table2.discriminator_accuracy(tmp_path / "absent.csv") is None
    # The chance band: 0.5 +- 0.05 is "no adversarial signal".
    assert table2.no_adversarial_signal(0.54) and table2.no_adversarial_signal(0.46)
    assert not table2.no_adversarial_signal(0.56) and not table2.no_adversarial_signal(None)


def test_overrides_the_command_sets_are_refused():
    table2.check_overrides(["data.world=open", "logger=csv", "discriminator.warmup=50"])
    with pytest.raises(SystemExit):
        table2.check_overrides(["seed=3"])
    with pytest.raises(SystemExit):
        table2.check_overrides(["loss=cond_adv"])
    # An experiment would reach training but not scoring (it scored the open world's students with
    # the simple world's text encoders); the world goes by its parts.
    with pytest.raises(SystemExit, match="model=toy_open metrics=toy_open data.world=open"):
        table2.check_overrides(["experiment=toy_open"])


@pytest.mark.slow
def test_table2_command_writes_cells_with_intervals_and_reuses_runs(tmp_path):
    out = tmp_path / "table2"
    argv = [
        "--out", str(out), "--seeds", "2", "--phase-steps", "2", "--num-images", "8",
        "trainer.enable_progress_bar=false", f"metrics.cache_dir={tmp_path / 'stats'}",
    ]
    table2.main(argv)
    result = json.loads((out / "table2.json").read_text())
    assert result["settings"]["stages"] == ["4to2", "2to1"] and list(result["settings"]["arms"]) == list(table2.ARMS)
    assert [(r["stage"], r["role"], r["steps"]) for r in result["teacher"]] == [
        ("4to2", "teacher (baseline)", 2), ("4to2", "teacher (reference)", 4),
        ("2to1", "teacher (baseline)", 1), ("2to1", "teacher (reference)", 2),
    ]
    assert result["teacher"][1]["hf_ratio"] == pytest.approx(1.0)
    # Every run was scored at the stage's student steps; each cell has both seeds and an interval.
    assert len(result["runs"]) == 2 * 3 * 2
    assert {(r["stage"], r["steps"]) for r in result["runs"]} == {("4to2", 2), ("2to1", 1)}
    for run in result["runs"]:
        assert all(math.isfinite(run[k]) for k in ("fid_whole", "fid_patch", "clip_score", "hf_ratio"))
        assert 0 <= run["precision"] <= 1 and 0 <= run["recall"] <= 1
        assert (run["d_accuracy"] is None) == (run["arm"] == "mse")
        assert (out / "runs" / run["run"] / "export" / "unet").is_dir()
    for cell in result["cells"]:
        assert cell["seeds"] == 2 and cell["metrics"]["fid_whole"]["n"] == 2
        assert cell["metrics"]["fid_whole"]["half_width"] is not None
        assert len(cell["metrics"]["clip_score"]["values"]) == 2
    table = (out / "table2.md").read_text()
    assert "| 4to2 | teacher (baseline) | 2 |" in table and "| 2to1 | mse_adv | 1 | 2 |" in table and " ± " in table
    assert (out / "grid.png").exists() and len(result["grid_rows"]) == 2 * (2 + 3)
    assert result["timing"]["runs_trained"] == 12

    # A rerun trains nothing and scores nothing again.
    records = {path: path.stat().st_mtime_ns for path in (out / "eval").glob(f"*/{table2.SCORE_FILE}")}
    assert len(records) == 1 + 12
    table2.main(argv)
    again = json.loads((out / "table2.json").read_text())
    assert again["timing"]["runs_trained"] == 0 and again["runs"] == result["runs"]
    assert all(path.stat().st_mtime_ns == stamp for path, stamp in records.items())


@pytest.mark.slow
def test_table2_recipe_command_writes_the_table_and_grid(tmp_path):
    out = tmp_path / "table2_recipe"
    table2_recipe.main([
        "--out", str(out), "--phase-steps", "2", "--num-images", "8",
        "trainer.enable_progress_bar=false", "logger=csv", f"metrics.cache_dir={tmp_path / 'stats'}",
    ])
    result = json.loads((out / "table2.json").read_text())
    models = [row["model"] for row in result["rows"]]
    progressive = [f"{arm} {stage}" for arm in ("adversarial", "mse") for stage in table2_recipe.STAGE_STEPS]
    assert models == ["teacher", *progressive] + ["tscd LoRA"] * 4  # TSCD's one LoRA at 8, 4, 2, 1 steps
    assert [row["steps"] for row in result["rows"]] == [32] + [8, 4, 2, 1] * 3
    assert set(result["timing"]["arms"]) == set(table2_recipe.ARMS)
    assert all(math.isfinite(row[k]) for row in result["rows"] for k in ("fid_whole", "fid_patch", "clip_score"))
    assert (out / "grid.png").exists() and "| teacher | 32 |" in (out / "table2.md").read_text()
    # The shared 128 to 32 MSE phase ran once: the MSE arm links the adversarial arm's.
    assert (out / "mse" / "00_128to32_mse").is_symlink()
