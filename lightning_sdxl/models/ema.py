"""An exponential moving average of a model's trainable weights: Hyper-SD's consistency target
network (METHOD.md 7), evaluated through `torch.func.functional_call` so no second UNet is held."""

from __future__ import annotations

import torch
from torch import nn


class EMAWeights(nn.Module):
    """EMA copies (float32 buffers, so they move and checkpoint with the LightningModule) of the
    weights of `model` that require gradients: a LoRA's adapters, or a full UNet's every weight.

    Args:
        model: the online model (the student UNet).
        decay: w_ema <- decay * w_ema + (1 - decay) * w after each optimizer step (0: the online weights).
    """

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"stage.ema_decay={decay} must lie in [0, 1).")
        self.decay = decay
        self.names = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
        parameters = dict(model.named_parameters())
        for index, name in enumerate(self.names):  # buffer names may not hold dots
            self.register_buffer(f"weight_{index}", parameters[name].detach().float().clone())

    def averages(self) -> list[torch.Tensor]:
        return [getattr(self, f"weight_{index}") for index in range(len(self.names))]

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        parameters = dict(model.named_parameters())
        for name, average in zip(self.names, self.averages()):
            average.lerp_(parameters[name].detach().float(), 1.0 - self.decay)

    def call(self, model: nn.Module, *args, **kwargs):
        """`model(*args, **kwargs)` with the averaged weights in place of its trainable ones."""
        parameters = dict(model.named_parameters())
        weights = {name: average.to(parameters[name].dtype) for name, average in zip(self.names, self.averages())}
        return torch.func.functional_call(model, weights, args, kwargs)
