"""Non-finite losses and gradients are skipped and counted; too many in a row stop the run with a
clear error and nothing is exported (issue 15)."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_sdxl.finite_guard import NonFiniteGuard, NonFiniteTrainingError, all_finite


def test_all_finite_sees_nan_and_inf_and_skips_missing_gradients():
    assert all_finite([torch.ones(3), None, torch.zeros(2, 2)])
    assert all_finite([])  # nothing to check (e.g. no gradients yet)
    assert not all_finite([torch.ones(3), torch.tensor([1.0, math.nan])])
    assert not all_finite([torch.tensor([math.inf])])


def test_guard_counts_skips_resets_on_a_finite_step_and_stops_after_the_limit():
    guard = NonFiniteGuard(limit=2)
    assert guard.check(True, "generator", "loss", 0)
    assert not guard.check(False, "generator", "loss", 1)  # skipped, counted
    assert guard.check(True, "generator", "loss", 2)  # a finite step resets the run of failures
    assert not guard.check(False, "generator", "loss", 3)
    assert not guard.check(False, "discriminator", "loss", 3)  # counted per optimizer
    with pytest.raises(NonFiniteTrainingError, match="2 steps in a row.*student.lr"):
        guard.check(False, "generator", "gradient", 4)
    assert guard.skipped == {"generator": 3, "discriminator": 1}
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        NonFiniteGuard(0)


class PoisonStudent(L.Callback):
    """Sets the student's trainable weights to NaN before batch `at`: every later loss is NaN."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.at:
            with torch.no_grad():
                for parameter in module.pair.trainable_parameters():
                    parameter.fill_(math.nan)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        # The guard: NaN losses from batch 1 on stop the run at its limit (2 in a row).
        (("loss=uncond_adv", "steps=8", "optim.max_nonfinite_steps=2"), "generator's loss was not finite .* 2 steps in a row"),
        # The last line of defence: a run that ends before the guard's limit (5) ships no NaN.
        (("loss=mse", "steps=2", "optim.max_nonfinite_steps=5"), "weights hold NaN or inf: nothing was exported"),
    ],
    ids=["guard", "export"],
)
def test_a_nan_run_stops_with_a_clear_error_and_exports_nothing(overrides, message, make_config):
    from lightning_sdxl.train import train

    cfg = make_config(*overrides, "checkpoint.every_n_steps=100", "validation.every_n_steps=100", "logger=none")
    with pytest.raises(NonFiniteTrainingError, match=message):
        train(cfg, [PoisonStudent(at=1)])
    assert not (Path(cfg.output_dir) / "export").exists(), "a NaN student must not be exported"
