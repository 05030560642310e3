"""Distil one SDXL-Lightning stage: python train.py [stage=2to1 loss=uncond_adv trainer.devices=8 ...]."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from lightning_sdxl.errors import ConfigError
from lightning_sdxl.finite_guard import NonFiniteTrainingError
from lightning_sdxl.recipe import run_recipe
from lightning_sdxl.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.get("recipe"):  # experiment=toy_recipe / sdxl_recipe: every stage and phase in turn
            run_recipe(cfg, list(HydraConfig.get().overrides.task))
        else:
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
