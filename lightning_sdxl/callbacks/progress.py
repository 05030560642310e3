"""Progress in batches, the project's step convention (lightning_sdxl/module.py): a bar on a
terminal, plain log lines elsewhere (SLURM logs, `> run.log`), where a bar prints nothing until
the run ends."""

from __future__ import annotations

import logging
import time

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar

from lightning_sdxl.steps import to_batches

log = logging.getLogger(__name__)


def batches_in_run(trainer: L.Trainer) -> int:
    """The run's length in batches (Lightning's `max_steps` counts optimizer steps)."""
    module = trainer.lightning_module
    return to_batches(trainer.max_steps, module.optimizers_per_batch, module.accumulate_grad_batches)


def batches_done(trainer: L.Trainer) -> int:
    return trainer.lightning_module.batches_trained


class BatchProgressBar(RichProgressBar):
    """Lightning sizes the bar from `max_steps`, which counts optimizer steps, so a finished run
    would read 200/400; this bar's total is the batches left, and its title says "Training"
    (Lightning's "Epoch 0/-2" counts epochs of an unbounded, step-limited run)."""

    @property
    def total_train_batches(self) -> int | float:
        trainer = self.trainer
        if trainer.max_epochs == -1 and trainer.max_steps and trainer.max_steps > 0:
            remaining = batches_in_run(trainer) - batches_done(trainer)
            return min(trainer.num_training_batches, remaining)
        return trainer.num_training_batches

    def _get_train_description(self, current_epoch: int) -> str:
        return f"{'Training':{len(self.validation_description)}}"


class ProgressLog(L.Callback):
    """One plain-text line every `every_n_seconds` and at the end: batches done of the run, rate,
    ETA and the progress-bar metrics (losses). Global rank 0 only.

    Args:
        every_n_seconds: the interval between lines.
    """

    def __init__(self, every_n_seconds: float = 30.0):
        self.every_n_seconds = every_n_seconds
        self._started = self._last = 0.0
        self._first_batch = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = self._last = time.monotonic()
        self._first_batch = batches_done(trainer)  # a resumed run counts its rate from here

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.monotonic()
        if trainer.is_global_zero and now - self._last >= self.every_n_seconds:
            self._last = now
            log.info(self.line(trainer, now))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            done = batches_done(trainer)
            log.info(
                "Finished: %d batches trained in %s (Lightning's global step %d counts optimizer steps).",
                done, _duration(time.monotonic() - self._started), trainer.global_step,
            )

    def line(self, trainer: L.Trainer, now: float) -> str:
        done, total = batches_done(trainer), batches_in_run(trainer)
        rate = (done - self._first_batch) / max(now - self._started, 1e-9)  # batches / s
        eta = _duration((total - done) / rate) if rate > 0 else "?"
        metrics = " ".join(
            f"{name}={float(value):.4g}" for name, value in sorted(trainer.progress_bar_metrics.items())
        )
        return f"batch {done}/{total} ({100 * done / max(total, 1):.0f}%) | {rate:.2f} batch/s | ETA {eta} | {metrics}".rstrip(" |")


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
