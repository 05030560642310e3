"""Prediction types: what the UNet outputs (u), and conversions to (x0_hat, eps_hat) (METHOD.md 1)."""

from __future__ import annotations

import torch


class Prediction:
    """Converts between (x_t, u) and (x0, eps) at noise level a_t ((B, 1, 1, 1) tensors)."""

    name: str

    def to_x0_eps(self, x_t: torch.Tensor, u: torch.Tensor, a_t: torch.Tensor):
        """(x0_hat, eps_hat) implied by model output u at x_t."""
        raise NotImplementedError

    def target(self, x_t: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, a_t: torch.Tensor):
        """The model output u that would predict exactly (x0, eps): the regression target."""
        raise NotImplementedError


class EpsilonPrediction(Prediction):
    name = "epsilon"

    def to_x0_eps(self, x_t, u, a_t):
        return (x_t - (1 - a_t).sqrt() * u) / a_t.sqrt(), u

    def target(self, x_t, x0, eps, a_t):
        return eps


class SamplePrediction(Prediction):
    """x0 prediction, the 1-step model's form (METHOD.md 4)."""

    name = "sample"

    def to_x0_eps(self, x_t, u, a_t):
        return u, (x_t - a_t.sqrt() * u) / (1 - a_t).sqrt()

    def target(self, x_t, x0, eps, a_t):
        return x0


class VPrediction(Prediction):
    name = "v_prediction"

    def to_x0_eps(self, x_t, u, a_t):
        return a_t.sqrt() * x_t - (1 - a_t).sqrt() * u, (1 - a_t).sqrt() * x_t + a_t.sqrt() * u

    def target(self, x_t, x0, eps, a_t):
        return a_t.sqrt() * eps - (1 - a_t).sqrt() * x0


PREDICTIONS = {cls.name: cls for cls in (EpsilonPrediction, SamplePrediction, VPrediction)}


def get_prediction(name: str) -> Prediction:
    """Args: name: "epsilon", "sample" or "v_prediction" (diffusers' `prediction_type`)."""
    if name not in PREDICTIONS:
        raise ValueError(f"Unknown prediction type {name!r}: choose one of {sorted(PREDICTIONS)}.")
    return PREDICTIONS[name]()
