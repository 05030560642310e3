"""Distil one SDXL-Lightning stage: python train.py [stage=2to1 loss=uncond_adv trainer.devices=8 ...]."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, open_dict

from lightning_sdxl import run_config
from lightning_sdxl.config_checks import validate_config
from lightning_sdxl.errors import ConfigError
from lightning_sdxl.finite_guard import NonFiniteTrainingError
from lightning_sdxl.recipe import run_recipe
from lightning_sdxl.run_config import compose_train_config
from lightning_sdxl.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        overrides = list(HydraConfig.get().overrides.task)
        if cfg.get("recipe"):  # experiment=toy_recipe / sdxl_recipe: every stage and phase in turn
            run_recipe(cfg, overrides)
        else:
            composed = run_config.overrides_for(cfg.output_dir, overrides)
            if composed != overrides:  # a resume: the run's own settings, then this command's
                output_dir, cfg = cfg.output_dir, compose_train_config(composed)
                with open_dict(cfg):
                    cfg.output_dir = output_dir
            validate_config(cfg)  # a run that cannot start records nothing
            run_config.record(cfg.output_dir, overrides)
            train(cfg)
    except ConfigError as error:  # includes missing weights folders and data roots
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)
    except SIGTERMException:  # preempted: PreemptionCheckpoint saved last.ckpt; never look successful
        print("Stopped by SIGTERM: resume with ckpt_path=last and the same output folder.", file=sys.stderr)
        sys.exit(143)
    except NonFiniteTrainingError as error:  # NaN/inf for optim.max_nonfinite_steps steps in a row
        print(f"Training error: {error}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
