"""Hydra's OmegaConf containers as plain Python values, for module hyperparameters: checkpoints
then hold only lists, dicts and scalars and load with `torch.load(weights_only=True)`."""

from __future__ import annotations

from omegaconf import DictConfig, ListConfig, OmegaConf


def plain_config(value):
    """OmegaConf containers (from Hydra) and tuples as plain lists and dicts."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return list(value) if isinstance(value, tuple) else value
