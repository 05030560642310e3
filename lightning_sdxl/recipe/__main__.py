"""python -m lightning_sdxl.recipe experiment=toy_recipe [overrides]: the recipe's own entry (the same
as `python train.py experiment=toy_recipe`)."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lightning_sdxl import CONF_DIR
from lightning_sdxl.errors import ConfigError
from lightning_sdxl.recipe.run import run_recipe


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        if not cfg.get("recipe"):
            raise ConfigError("no recipe in the config: add experiment=toy_recipe or experiment=sdxl_recipe.")
        run_recipe(cfg, list(HydraConfig.get().overrides.task))
    except ConfigError as error:
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
