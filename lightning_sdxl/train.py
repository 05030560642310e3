"""train(cfg): validate the config, then instantiate data, module, callbacks, loggers, trainer; fit."""

from __future__ import annotations

import logging
import sys
import warnings

import hydra
import lightning as L
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf, open_dict

from lightning_sdxl.callbacks.progress import BatchProgressBar, ProgressLog
from lightning_sdxl.callbacks.rng_state import RngStateCheckpoint
from lightning_sdxl.config_checks import validate_config
from lightning_sdxl.errors import instantiate_checked
from lightning_sdxl.io import AtomicCheckpointIO
from lightning_sdxl.run_lock import check_not_locked, run_lock
from lightning_sdxl.steps import to_optimizer_steps

log = logging.getLogger(__name__)

# Lightning warnings that describe this design, not a problem: the frozen teacher, VAE and text
# encoders are in eval mode on purpose, and manual-optimization checkpoints hold post-step weights.
# The third is Lightning 2.6's own use of a torch API that torch 2.14 deprecates.
for _message in (
    r"Found \d+ module\(s\) in eval mode",
    r"Using ModelCheckpoint with manual optimization",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
):
    warnings.filterwarnings("ignore", message=_message)


class _HideMaxStepsReached(logging.Filter):
    """Lightning ends a run with "`max_steps=400` reached" where the user asked for steps=200
    batches (its max_steps counts optimizer steps); ProgressLog's last line says it in batches."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "`Trainer.fit` stopped: `max_steps=" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_HideMaxStepsReached())


def optimizer_steps(cfg: DictConfig, batches: int) -> int:
    """Lightning global steps for `batches` batches (lightning_sdxl/steps.py): the loss says how many
    optimizers a batch steps, the module's config whether it accumulates (a teacher run does not: it
    takes no optim group)."""
    accumulate = OmegaConf.select(cfg, "module.optim.accumulate_grad_batches", default=1)
    return to_optimizer_steps(batches, hydra.utils.instantiate(cfg.loss).optimizers_per_batch, accumulate)


def _multi_device(trainer_cfg: DictConfig) -> bool:
    devices = trainer_cfg.get("devices", 1)
    count = len(devices) if not isinstance(devices, (int, str)) else devices
    return trainer_cfg.get("num_nodes", 1) > 1 or count in (-1, "-1", "auto") or int(count) > 1


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """The Trainer of `cfg.trainer` with the derived step counts and checkpoint writer."""
    # The datamodules' ResumableSampler shards over ranks itself and resumes mid-epoch; Lightning's
    # DistributedSampler would restart the epoch (data/resumable.py).
    kwargs = {"max_steps": optimizer_steps(cfg, cfg.steps), "use_distributed_sampler": False}
    callbacks = [*callbacks, RngStateCheckpoint()]  # exact resume needs the RNG states
    if cfg.trainer.get("enable_progress_bar", True) and sys.stdout.isatty():
        callbacks = [*callbacks, BatchProgressBar()]
    else:  # a log file or a SLURM job: a bar prints nothing until the end; plain lines instead
        callbacks = [*callbacks, ProgressLog(cfg.progress_log_seconds)]
        kwargs["enable_progress_bar"] = False
    if cfg.trainer.strategy == "ddp" or (cfg.trainer.strategy == "auto" and _multi_device(cfg.trainer)):
        # The generator's and the discriminator's backward each leave the other's weights without
        # gradients, which DDP refuses unless it looks for them (docs/MEASUREMENTS.md, "DDP with two
        # optimizers"): the training code sets it, not a config value a user could drop.
        kwargs["strategy"] = DDPStrategy(find_unused_parameters=True)
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers, plugins=[AtomicCheckpointIO()], **kwargs
    )


def instantiate_callbacks(cfg: DictConfig) -> list[L.Callback]:
    callbacks = []
    for name, callback_cfg in (cfg.get("callbacks") or {}).items():
        if name == "model_checkpoint":
            with open_dict(callback_cfg):
                callback_cfg.every_n_train_steps = optimizer_steps(cfg, cfg.checkpoint.every_n_steps)
        log.info("Instantiating callback <%s>", callback_cfg._target_)
        callbacks.append(instantiate_checked(callback_cfg))
    return callbacks


def instantiate_loggers(cfg: DictConfig) -> list:
    return [hydra.utils.instantiate(logger_cfg) for logger_cfg in (cfg.get("logger") or {}).values()]


def train(cfg: DictConfig, extra_callbacks: list[L.Callback] = ()) -> L.Trainer:
    """Run one stage (or phase) of distillation as configured. Returns the fitted Trainer.

    Args:
        cfg: the composed config (conf/train.yaml).
        extra_callbacks: callbacks added to the configured ones (notebooks, tests).
    """
    validate_config(cfg)
    check_not_locked(cfg.output_dir)  # before the models load; the lock itself is taken around fit
    L.seed_everything(cfg.seed, workers=True)
    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    datamodule = hydra.utils.instantiate(cfg.data)
    # Callbacks before the module: missing metric weights fail before SDXL loads.
    callbacks = instantiate_callbacks(cfg) + list(extra_callbacks)
    log.info("Instantiating module: stage %s, loss %s, %s student", cfg.stage.name, cfg.loss.name, cfg.student.type)
    module = hydra.utils.instantiate(cfg.module)
    trainer = build_trainer(cfg, callbacks, instantiate_loggers(cfg))
    with run_lock(cfg.output_dir):
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    return trainer
