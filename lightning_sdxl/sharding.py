"""Fully sharded data parallel training (`trainer=fsdp`): PyTorch's FSDP2 (`fully_shard`) through
Lightning's `ModelParallelStrategy`, data parallel only.

Why this path: Lightning's `FSDPStrategy` (FSDP1) and `DeepSpeedStrategy` refuse the CPU, so they could
never be tested here; `ModelParallelStrategy` runs FSDP2 on CPU (gloo) and GPU (NCCL) alike, with two
optimizers under manual optimization and distributed checkpoints that keep optimizer state
(docs/MEASUREMENTS.md, "Sharding"). DeepSpeed ZeRO: Lightning's DeepSpeed strategy drives one
optimizer through the engine's own step; the generator/discriminator alternation would bypass it.

What is sharded (`shard_distillation_module`): the student UNet (each down block, the mid block, each
up block, then the rest) and the discriminator (each backbone block, then the rest, head included);
with `shard_frozen` also a separate frozen teacher (a full student's frozen copy). A LoRA student's
teacher is its own base weights, sharded with it. The VAE and text encoders stay replicated (frozen,
small beside the UNets).

Checkpoints are distributed (a folder per checkpoint, every rank writes its shards), written to a
temporary folder and swapped into place, and hold only the trainable weights and their optimizer
states, like the single-process checkpoints (`DistillationModule.on_save_checkpoint`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

from lightning_sdxl.activation_checkpointing import (
    checkpointing_mode,
    enable_activation_checkpointing,
)
from lightning_sdxl.io import swap_into_place

# A distributed checkpoint is a folder of shards plus Lightning's metadata file (trainer state,
# hyperparameters, callbacks), as Lightning's ModelParallelStrategy writes it.
SHARDED_METADATA = "meta.pt"


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


class FullyShardedStrategy(ModelParallelStrategy):
    """Lightning's ModelParallelStrategy as plain FSDP2 over every process (no tensor parallelism).

    Args:
        param_dtype: dtype in which sharded weights are gathered and computed ("bfloat16" on GPUs;
            None: the weights' own, float32). Master weights and optimizer states stay float32.
        reduce_dtype: dtype of the gradient reduce-scatter.
        activation_checkpointing: "none", "selective" or "full" (lightning_sdxl/activation_checkpointing.py)
            for the student's and the discriminator backbone's blocks, trading compute for memory;
            None: as the module set them (`student.gradient_checkpointing`).
        shard_frozen: also shard a separate frozen teacher (a full student's copy) instead of holding
            it whole on every GPU.
        kwargs: ModelParallelStrategy's (process_group_backend, timeout).
    """

    def __init__(
        self,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
        activation_checkpointing: str | bool | None = None,
        shard_frozen: bool = False,
        **kwargs: Any,
    ):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=True, **kwargs)
        self.param_dtype = getattr(torch, param_dtype) if param_dtype else None
        self.reduce_dtype = getattr(torch, reduce_dtype) if reduce_dtype else None
        self.activation_checkpointing = (
            None if activation_checkpointing is None else checkpointing_mode(activation_checkpointing)
        )
        self.shard_frozen = shard_frozen

    def setup_environment(self) -> None:
        # Every process shards the same model: data parallel size = all processes of all nodes.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def shard(self, module: nn.Module) -> None:
        """Apply FSDP2 to a DistillationModule (its `configure_model`)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy

        policy = MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=self.reduce_dtype)
        shard_distillation_module(
            module, self.device_mesh["data_parallel"], policy, self.activation_checkpointing, self.shard_frozen
        )

    # ---- checkpoints: atomic, trainable weights only --------------------------------------------

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Every rank writes its shards into one temporary folder; rank 0 swaps it in for `filepath`
        once all have finished, so an interrupted save leaves the previous checkpoint whole."""
        path = Path(self.broadcast(str(filepath)))
        temporary = Path(self.broadcast(str(path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")))
        super().save_checkpoint(checkpoint, temporary, storage_options)
        self.barrier("checkpoint written")
        if self.global_rank == 0:
            swap_into_place(temporary, path)
        self.barrier("checkpoint in place")

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """A distributed checkpoint of this project holds the trainable weights only: load those
        (Lightning's loader asks for every weight, the frozen teacher's too, and fails)."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded_checkpoint(path):
            return super().load_checkpoint(checkpoint_path, weights_only)
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_optimizer_state_dict,
        )

        keys = self.lightning_module.trainable_state_keys()
        model_state = {key: value for key, value in get_model_state_dict(self.model).items() if key in keys}
        dcp.load({"state_dict": model_state}, checkpoint_id=path)
        self.model.load_state_dict(model_state, strict=False)
        for index, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{index}": get_optimizer_state_dict(self.model, optimizer)}
            dcp.load(state, checkpoint_id=path)
            set_optimizer_state_dict(
                self.model, optimizer, optim_state_dict=state[f"optimizer_{index}"],
                options=StateDictOptions(cpu_offload=True),
            )
        metadata = torch.load(path / SHARDED_METADATA, weights_only=True)
        metadata["state_dict"] = model_state  # loaded already; the module's on_load_checkpoint checks its keys
        return metadata


def _shard_unet_like(model: nn.Module, mesh, policy) -> None:
    """fully_shard each down block, the mid block and each up block, then the model itself (the
    embeddings, conv_in/out and, for the discriminator, the head gathered with the root)."""
    from torch.distributed.fsdp import fully_shard

    for name in ("down_blocks", "up_blocks"):
        for block in getattr(model, name, None) or []:
            fully_shard(block, mesh=mesh, mp_policy=policy)
    if getattr(model, "mid_block", None) is not None:
        fully_shard(model.mid_block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


def shard_distillation_module(module: nn.Module, mesh, policy, activation_checkpointing: str | None, shard_frozen: bool) -> None:
    """Shard a DistillationModule's trainable networks in place (see the module docstring)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    pair = module.pair
    if activation_checkpointing is not None:
        enable_activation_checkpointing(pair.unet, activation_checkpointing)
    _shard_unet_like(pair.unet, mesh, policy)
    if pair.teacher_unet is not None and shard_frozen:
        _shard_unet_like(pair.teacher_unet, mesh, policy)
    if module.discriminator is not None:
        backbone = module.discriminator.backbone
        if activation_checkpointing is not None:
            enable_activation_checkpointing(backbone, activation_checkpointing)
        for block in [*backbone.down_blocks, backbone.mid_block]:
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(module.discriminator, mesh=mesh, mp_policy=policy)
        for method in ("judge", "judge_fake", "judge_real"):
            register_fsdp_forward_method(module.discriminator, method)


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(child, FSDPModule) for child in module.modules())


@contextmanager
def gathered_for_export(module: nn.Module, rank_zero: bool) -> Iterator[None]:
    """Called on every rank: gathers the student's and discriminator's full weights (a collective);
    on rank 0 the block runs with plain, unsharded CPU copies in their place (the export writers
    read ordinary modules), restored afterwards. Nothing changes for an unsharded module."""
    if not is_sharded(module):
        yield
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors on rank 0 only
    unet_state = get_model_state_dict(module.pair.unet, options=options)
    discriminator_state = (
        get_model_state_dict(module.discriminator, options=options) if module.discriminator is not None else None
    )
    if not rank_zero:
        yield
        return
    sharded_unet, sharded_discriminator = module.pair.unet, module.discriminator
    module.pair.unet = plain_unet(sharded_unet, unet_state)
    if sharded_discriminator is not None:
        module.discriminator = plain_discriminator(sharded_discriminator, sharded_unet.config, discriminator_state)
    try:
        yield
    finally:
        module.pair.unet, module.discriminator = sharded_unet, sharded_discriminator


def _filled(copy: nn.Module, like: nn.Module, full_state: dict[str, torch.Tensor]) -> nn.Module:
    """`copy` (built on the meta device) holding `full_state`, trainable where `like` is."""
    copy.load_state_dict(full_state, strict=True, assign=True)
    for name, parameter in like.named_parameters():
        copy.get_parameter(name).requires_grad_(parameter.requires_grad)
    return copy


def plain_unet(sharded, full_state: dict[str, torch.Tensor]):
    """An unsharded CPU UNet like `sharded` (diffusers' `from_config` plus its peft adapters)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        copy = UNet2DConditionModel.from_config(sharded.config)
        for name, config in getattr(sharded, "peft_config", {}).items():
            copy.add_adapter(config, adapter_name=name)
    return _filled(copy, sharded, full_state)


def plain_discriminator(sharded, unet_config, full_state: dict[str, torch.Tensor]):
    """An unsharded CPU discriminator like `sharded` (built from a meta UNet of `unet_config`)."""
    from diffusers import UNet2DConditionModel

    from lightning_sdxl.models.discriminator import Discriminator

    with torch.device("meta"):
        copy = Discriminator.from_unet(
            UNet2DConditionModel.from_config(unet_config), conditional=sharded.conditional,
            head_channels=sharded.head.hidden_channels, head_blocks=sharded.head.num_blocks,
        )
    return _filled(copy, sharded, full_state)
