"""Save `last.ckpt` when a run is preempted (SIGTERM from a cluster scheduler, or Ctrl+C).

Lightning stops a run on SIGTERM after the current batch (`SIGTERMException`, a SystemExit with
code 0) and saves nothing, so a preempted job looked successful and lost up to
`checkpoint.every_n_steps` batches (issue 15). This callback writes the checkpoint that
`ckpt_path=last` resumes from; train.py then exits 143 (128 + SIGTERM; Lightning exits 1 after Ctrl+C). SLURM's
requeue-on-signal is Lightning's own (`SLURMEnvironment(auto_requeue=True)`, with
`#SBATCH --signal=SIGUSR1@90`).

Lightning's `OnExceptionCheckpoint` is not used: it saves on every exception (a NaN run's weights
included) and deletes its file again at teardown.
"""

from __future__ import annotations

import logging
import os

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM or KeyboardInterrupt during fit: `trainer.save_checkpoint(<dirpath>/last.ckpt)`.

    Args:
        dirpath: the checkpoint folder (ModelCheckpoint's, so `ckpt_path=last` finds the file).
        filename: file name without extension; "last" as ModelCheckpoint's `save_last`.
    """

    def __init__(self, dirpath: str, filename: str = "last"):
        self.path = os.path.join(dirpath, f"{filename}.ckpt")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or not trainer.training:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # full state; every rank (a collective), rank 0 writes
        log.warning("Preempted at global step %d: saved %s (resume with ckpt_path=last).", trainer.global_step, self.path)
