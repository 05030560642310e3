"""A progress bar that counts batches, the project's step convention (lightning_sdxl/module.py)."""

from __future__ import annotations

from lightning.pytorch.callbacks import RichProgressBar


class BatchProgressBar(RichProgressBar):
    """Lightning sizes the bar from `max_steps`, which counts optimizer steps (2 per adversarial
    batch), so a finished run would read 200/400; this bar's total is the batches left."""

    @property
    def total_train_batches(self) -> int | float:
        trainer, module = self.trainer, self.trainer.lightning_module
        steps_per_batch = module.optimizers_per_batch / module.hparams.accumulate_grad_batches
        if trainer.max_epochs == -1 and trainer.max_steps and trainer.max_steps > 0:
            remaining = round((trainer.max_steps - trainer.global_step) / steps_per_batch)
            return min(trainer.num_training_batches, remaining)
        return trainer.num_training_batches
