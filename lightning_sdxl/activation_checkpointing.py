"""Activation checkpointing of a UNet's blocks (the student's, the discriminator backbone's): what a
block keeps from its forward for the backward.

    "full"       the block keeps only its inputs and runs its forward again in backward (diffusers'
                 gradient checkpointing): the least memory, one more forward of the network in FLOPs.
    "selective"  the block keeps the outputs of its compute-bound ops (convolutions, matrix products,
                 attention) and recomputes the rest in backward: the pointwise ops between them
                 (norms, activations, additions, casts) and the products that sum over fewer than
                 CHEAP_REDUCTION terms (a LoRA's up-projection, over its rank): torch's selective
                 activation checkpointing, with a policy in the spirit of torchtitan's "op" mode. At
                 SDXL's size (1024 px) the step keeps 40-45 % of the activations for under 0.5 % more
                 FLOPs than keeping everything (`python -m lightning_sdxl.benchmarks.step`,
                 docs/benchmark_step.md).
    "none"       everything the forward saves is kept.

`True` and `False` (the configs' former booleans) mean "full" and "none".
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

MODES = ("none", "selective", "full")

_aten = torch.ops.aten
# A product whose every output sums fewer terms than this costs little to recompute per byte it
# would hold: a LoRA's up-projection (rank 64) against the base layer it rides on (320-2560 inputs).
CHEAP_REDUCTION = 256
# Ops whose outputs a selective block keeps (but the cheap products, `keep_compute_bound_outputs`):
# every op FlopCounterMode counts in a UNet, so that backward recomputes almost no matrix FLOPs.
# Attention's variants by backend (CUDA flash / memory-efficient /
# cuDNN, the CPU's flash and the math fallback's batched products).
COMPUTE_BOUND_OPS = {
    _aten.mm.default,
    _aten.addmm.default,
    _aten.bmm.default,
    _aten.baddbmm.default,
    _aten.convolution.default,
    _aten._scaled_dot_product_flash_attention.default,
    _aten._scaled_dot_product_efficient_attention.default,
    _aten._scaled_dot_product_cudnn_attention.default,
    _aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def checkpointing_mode(value: str | bool | None) -> str:
    """A config value as one of MODES; anything else is an error that lists them."""
    if value is None or value is False:
        return "none"
    if value is True:
        return "full"
    if value not in MODES:
        raise ValueError(f"activation checkpointing {value!r} is not one of {', '.join(MODES)} (or true / false)")
    return value


def _reduction_size(op, args) -> int | None:
    """Terms summed per output element by a linear layer's or convolution's product (None: other ops,
    attention's batched products included, which are always kept)."""
    if op is _aten.convolution.default:
        weight = args[1]  # (C_out, C_in / groups, kh, kw)
        return weight.shape[1] * weight[0, 0].numel()
    if op is _aten.mm.default:
        return args[0].shape[-1]
    if op is _aten.addmm.default:
        return args[1].shape[-1]
    return None


def keep_compute_bound_outputs(ctx, op, *args, **kwargs):
    """The selective policy: keep what the compute-bound ops produced, recompute everything else."""
    from torch.utils.checkpoint import CheckpointPolicy

    if op not in COMPUTE_BOUND_OPS:
        return CheckpointPolicy.PREFER_RECOMPUTE
    reduction = _reduction_size(op, args)
    cheap = reduction is not None and reduction < CHEAP_REDUCTION
    return CheckpointPolicy.PREFER_RECOMPUTE if cheap else CheckpointPolicy.MUST_SAVE


class _KeptEntries(dict):
    """One region's kept outputs of one op, written once by the forward. torch's selective
    checkpointing marks an entry consumed when a backward reads it and refuses a second backward;
    the lean step backpropagates twice through the discriminator's fake rows (the generator's
    gradient, then D's loss: `DistillationModule.judge_once`), so entries stay until the graph goes."""

    def __setitem__(self, index, value):
        if index not in self:
            super().__setitem__(index, value)


def selective_contexts(policy):
    """torch's `create_selective_checkpoint_contexts(policy)` over storage that a second backward can read."""
    from collections import defaultdict

    from torch.utils.checkpoint import _CachedTorchDispatchMode, _CachingTorchDispatchMode

    storage = defaultdict(_KeptEntries)
    return _CachingTorchDispatchMode(policy, storage), _CachedTorchDispatchMode(policy, storage)


def checkpoint_function(mode: str, policy=keep_compute_bound_outputs):
    """The function diffusers' blocks call in place of their forward when checkpointing."""
    from torch.utils.checkpoint import checkpoint

    if mode == "selective":
        return partial(checkpoint, use_reentrant=False, context_fn=partial(selective_contexts, policy))
    return partial(checkpoint, use_reentrant=False)


def enable_activation_checkpointing(network: nn.Module, mode: str | bool = "full", policy=keep_compute_bound_outputs) -> None:
    """Checkpoint every block of `network` that supports diffusers' gradient checkpointing (a UNet's
    down, mid and up blocks; the discriminator's backbone, built from them) in `mode`; "none" turns
    it off. `policy` (selective only): which ops' outputs to keep (the benchmark's counting one)."""
    mode = checkpointing_mode(mode)
    function = checkpoint_function(mode, policy) if mode != "none" else None
    for block in network.modules():
        if hasattr(block, "gradient_checkpointing"):
            block.gradient_checkpointing = function is not None
            if function is not None:
                block._gradient_checkpointing_func = function
