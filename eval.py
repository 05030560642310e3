"""Evaluate a model (teacher, checkpoint, exported UNet or LoRA) at several step counts: FID-Whole,
FID-Patch and CLIP score. python eval.py target.kind=checkpoint target.path=... steps=[1,2,4,8]"""

import sys

import hydra
from omegaconf import DictConfig

from lightning_sdxl.errors import ConfigError
from lightning_sdxl.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except ConfigError as error:  # includes missing weights, checkpoints and data roots
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
