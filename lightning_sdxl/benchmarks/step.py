"""FLOPs of the real training step on SDXL's architecture beside the method's minimum.

    python -m lightning_sdxl.benchmarks.step [--resolution 1024] [--model sdxl|tiny]

For every stage and phase of the recipe (METHOD.md 2: 128to32 MSE; then per stage a conditional
adversarial LoRA, an unconditional adversarial LoRA and an unconditional adversarial full-UNet
phase), the module is built from the same Hydra config `train.py` composes (`experiment=sdxl
stage=... loss=... student=...`), with SDXL's modules on the meta device (no weights, no data:
`models/sdxl_architecture.py`), and one `training_step` is counted with torch's FlopCounterMode.

The method's minimum per sample, each term counted the same way on the same modules:
    teacher   n frozen UNet forwards (x 2 with CFG), no graph;
    student   one UNet forward and its backward into the trainable weights;
    D         (adversarial) one forward of the backbone and head over the distinct rows
              (x_t when conditional, the teacher's x_t', the student's x_t'), the backward of D's
              loss into D's weights over those rows, and the generator's backward through the
              backbone into the student's rows only (no weight gradients).
Latents and text embeddings are taken as cached: the real step is measured from a latent cache
(`data=cached`, the recipe's 13 phases read one cache), and `--from-images` adds the VAE encode
and text encoding every step then runs, as excess. Activation checkpointing's recomputation counts
as excess too (`--checkpointing`, default experiment=sdxl's selective; the memory table says what
each mode keeps).

Then the memory per GPU by phase, strategy, batch and checkpointing, and on the toy the Lightning
step beside a plain loop (`benchmarks/overhead.py`). Prints a table of TFLOPs per sample and their
ratio; the last line reads
`max FLOPs ratio to the method's minimum: X.XX`.
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from lightning_sdxl.activation_checkpointing import (
    MODES,
    enable_activation_checkpointing,
    keep_compute_bound_outputs,
)
from lightning_sdxl.batch_randomness import BatchRandomness
from lightning_sdxl.losses import discriminator_loss

# The recipe's phases (METHOD.md 2): (stage, loss, student).
PHASES = [("128to32", "mse", "lora")] + [
    (stage, loss, student)
    for stage in ("32to8", "8to4", "4to2", "2to1")
    for loss, student in (("cond_adv", "lora"), ("uncond_adv", "lora"), ("uncond_adv", "full"))
]


def count_flops(function) -> int:
    with FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def build_module(stage: str, loss: str, student: str, resolution: int, model: str, extra: tuple[str, ...] = ()):
    """The DistillationModule train.py would build for this phase (`extra`: more overrides), on the meta device."""
    import hydra

    from lightning_sdxl.models.sdxl_architecture import meta_sdxl_components
    from lightning_sdxl.run_config import compose_train_config

    overrides = [f"stage={stage}", f"loss={loss}", f"student={student}", f"data.resolution={resolution}"]
    if model == "sdxl":
        # Frozen parts in float32: FLOPs do not depend on the dtype (training runs them in bf16 under autocast).
        overrides = ["experiment=sdxl", "model.path=sdxl-architecture", "model.frozen_dtype=float32",
                     "data.root=unused", *overrides]
        components = meta_sdxl_components
    else:  # the tiny model's architecture (a quick check of this script)
        from lightning_sdxl.models.loading import load_sdxl
        from lightning_sdxl.models.tiny import ensure_tiny_sdxl

        path = str(ensure_tiny_sdxl())
        overrides = ["model=tiny", f"model.path={path}", *overrides]
        components = lambda: _on_meta(load_sdxl(path))
    cfg = compose_train_config([*overrides, *extra])
    with mock.patch("lightning_sdxl.module.load_sdxl", lambda *args, **kwargs: components()):
        module = hydra.utils.instantiate(cfg.module)
    return module.to("meta")


def _on_meta(components):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        setattr(components, name, getattr(components, name).to("meta"))
    return components


class _Optimizer:
    def __init__(self, parameters):
        self.param_groups = [{"params": list(parameters)}]


@contextmanager
def _toggled(module, optimizer):
    """Lightning's toggled_optimizer: only `optimizer`'s weights require gradients in the block."""
    own = {id(p) for group in optimizer.param_groups for p in group["params"]}
    others = [p for p in module.parameters() if p.requires_grad and id(p) not in own]
    for parameter in others:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter in others:
            parameter.requires_grad_(True)


@contextmanager
def trainer_free(module, before_backward=lambda: None):
    """Run the module's own `training_step` without a Trainer: its optimizer step is the backward
    (no update, `before_backward` called first), logging is off, the discriminator warm-up is over."""
    from lightning_sdxl.module import DistillationModule

    optimizers = [_Optimizer(module.pair.trainable_parameters())]
    if module.discriminator is not None:
        optimizers.append(_Optimizer(module.discriminator.parameters()))

    def optimizer_step(index, loss, name, batch_idx, backward_loss=None):
        before_backward()
        if loss is not None:
            (loss if backward_loss is None else backward_loss).backward()

    with (
        mock.patch.object(module, "optimizers", lambda: optimizers),
        mock.patch.object(module, "trains_only", lambda optimizer: _toggled(module, optimizer)),
        mock.patch.object(module, "_optimizer_step", optimizer_step),
        mock.patch.object(module, "log", lambda *args, **kwargs: None),
        mock.patch.object(module, "log_dict", lambda *args, **kwargs: None),
        mock.patch.object(module, "log_accuracy_by_start", lambda *args: None),  # data-dependent: not on meta
        mock.patch.object(DistillationModule, "batches_trained", property(lambda self: 1 << 30)),
        mock.patch.object(module, "batch_randomness", BatchRandomness),  # no ranks: the global generator
    ):
        yield


def meta_batch(module, batch: int, resolution: int) -> dict:
    size = torch.tensor([[resolution, resolution]] * batch, device="meta")
    return {
        "pixel_values": torch.empty(batch, 3, resolution, resolution, device="meta"),
        "prompt": ["a photo of a cat"] * batch,
        "original_size": size,
        "crop_top_left": torch.zeros_like(size),
    }


def cached_meta_batch(module, batch: int) -> dict:
    """A `data=cached` batch (data/latent_cache.py): posteriors and conditions, no pixels."""
    condition = module.condition(["a photo of a cat"] * batch)
    latents = torch.empty(batch, 4, module.latent_size, module.latent_size, device="meta")
    return {"latent_mean": latents, "latent_logvar": torch.empty_like(latents), "prompt_embeds": condition.prompt_embeds,
            "pooled_prompt_embeds": condition.pooled_prompt_embeds, "add_time_ids": condition.add_time_ids}


def step_flops(module, batch: int, resolution: int, cached: bool = False) -> int:
    data = cached_meta_batch(module, batch) if cached else meta_batch(module, batch, resolution)
    with trainer_free(module):
        return count_flops(lambda: module.training_step(data, 0))


def minimum_flops(module, batch: int) -> dict[str, int]:
    """The method's minimum per term (module docstring), for `batch` samples."""
    stage = module.stage
    size = module.latent_size
    x = torch.empty(batch, 4, size, size, device="meta")
    t = torch.full((batch,), 999, device="meta")
    condition = module.condition(["a photo of a cat"] * batch)
    teacher_calls = (stage.teacher_steps // stage.student_steps) * (2 if stage.guidance_scale > 1 else 1)
    terms = {"teacher": teacher_calls * count_flops(lambda: module.pair.teacher(x, t, condition))}

    def student_forward_backward():
        module.pair.student(x, t, condition).float().sum().backward()

    with _no_checkpointing(module):  # recomputation is a memory trade, not the method's
        terms["student"] = count_flops(student_forward_backward)
        if module.discriminator is not None:
            terms.update(_discriminator_minimum(module, x, t, condition))
    return terms


@contextmanager
def _no_checkpointing(module):
    blocks = [block for block in module.modules() if getattr(block, "gradient_checkpointing", False)]
    for block in blocks:
        block.gradient_checkpointing = False
    try:
        yield
    finally:
        for block in blocks:
            block.gradient_checkpointing = True


def _discriminator_minimum(module, x, t, condition) -> dict[str, int]:
    terms = {}
    discriminator = module.discriminator
    real, fake = torch.empty_like(x), torch.empty_like(x)

    def forward_and_weight_backward():  # rows x_t (conditional), real, fake; inputs need no gradient
        logits_real, logits_fake = discriminator.judge(x, t, [real, fake], t, condition)
        discriminator_loss(logits_real, logits_fake).backward()

    terms["discriminator"] = count_flops(forward_and_weight_backward)
    # The generator's gradient through the backbone into the fake rows only, D's weights frozen; its
    # forward is the one above (shared), so only the backward counts. The head's share is negligible.
    discriminator.requires_grad_(False)
    fake_rows = torch.empty_like(x).requires_grad_(True)
    with torch.no_grad():
        backbone_forward = count_flops(lambda: discriminator.backbone(fake_rows, t, condition))
    through = count_flops(lambda: discriminator.backbone(fake_rows, t, condition).float().mean().backward())
    terms["generator_through_D"] = through - backbone_forward
    discriminator.requires_grad_(True)
    return terms


# ---- memory per GPU ---------------------------------------------------------------------------

GB = 1e9


class _KeptBytes:
    """Bytes kept for backward in the current phase of a step, each storage once, as bf16 (2 bytes
    per element). `selective_depth` > 0 while a selective block runs its forward (not its
    recomputation), where attention keeps its output and log-sum-exp."""

    def __init__(self, weights: set[int]):
        self.weights, self.seen, self.phases = weights, set(), [0]
        self.selective_depth, self.in_attention = 0, False

    def count(self, tensor) -> None:
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or id(tensor) in self.weights:
            return
        storage = tensor.untyped_storage()._cdata  # views of one tensor share it
        if storage not in self.seen:
            self.seen.add(storage)
            self.phases[-1] += tensor.untyped_storage().nbytes() // tensor.element_size() * 2

    def add(self, tensor: torch.Tensor) -> None:
        """A tensor the step keeps that is gone on the meta device (its storage may be reused)."""
        self.phases[-1] += tensor.numel() * 2

    def next_phase(self) -> None:
        self.seen.clear()
        self.phases.append(0)


_KEPT: _KeptBytes | None = None  # set while activation_bytes measures


class _FlashLikeAttention(torch.autograd.Function):
    """Scaled dot-product attention that saves what GPU flash / memory-efficient kernels save (q, k,
    v, the output and one log-sum-exp per query), not the N x N matrix the meta device's math path
    keeps. Its backward returns gradients of the right shape (values are meaningless on meta). In a
    selective block it is one kept op, as the flash kernel is on a GPU (activation_checkpointing.py)."""

    @staticmethod
    def forward(ctx, query, key, value):
        with torch.no_grad():
            if _KEPT is not None:
                _KEPT.in_attention = True  # the math path's products are not what a GPU keeps
            out = _SDPA(query, key, value)
            if _KEPT is not None:
                _KEPT.in_attention = False
        log_sum_exp = query.new_empty(query.shape[:-1])
        if _KEPT is not None and _KEPT.selective_depth:  # a GPU's selective block keeps the kernel's outputs
            _KEPT.add(out)
            _KEPT.add(log_sum_exp)
        ctx.save_for_backward(query, key, value, out, log_sum_exp)
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, _, _ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


_SDPA = torch.nn.functional.scaled_dot_product_attention


def _flash_like_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
    if attn_mask is not None or dropout_p or is_causal:
        return _SDPA(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kwargs)
    return _FlashLikeAttention.apply(query, key, value)


# Rows of the memory table: (student, discriminator backbone) modes of activation_checkpointing.py.
CHECKPOINTING = {
    "none": ("none", "none"),
    "student full": ("full", "none"),
    "selective": ("selective", "selective"),
    "full": ("full", "full"),
}


def configure_checkpointing(module, student: str, discriminator: str, policy=keep_compute_bound_outputs) -> None:
    enable_activation_checkpointing(module.pair.unet, student, policy)
    if module.discriminator is not None:
        enable_activation_checkpointing(module.discriminator.backbone, discriminator, policy)


def activation_bytes(module, batch: int, resolution: int, checkpointing: str, cached: bool = True) -> float:
    """Bytes kept for backward per sample by the larger of the step's two phases (generator,
    discriminator), as bf16 (2 bytes per element, as under bf16 autocast; norms that autocast keeps in
    float32 are undercounted), attention as flash kernels keep it: what autograd saves outside
    checkpointed blocks, each checkpointed block's inputs, and what a selective block keeps (its
    compute-bound ops' outputs). Weights are not counted (static memory)."""
    global _KEPT
    from torch.utils._pytree import tree_leaves
    from torch.utils.checkpoint import CheckpointPolicy

    kept = _KeptBytes({id(p) for p in module.parameters()})

    def pack(tensor):
        kept.count(tensor)
        return tensor

    def counting_policy(ctx, op, *args, **kwargs):
        if kept.in_attention:
            return CheckpointPolicy.PREFER_RECOMPUTE  # counted as the flash kernel's (_FlashLikeAttention)
        decision = keep_compute_bound_outputs(ctx, op, *args, **kwargs)
        if decision == CheckpointPolicy.MUST_SAVE and not ctx.is_recompute:
            for output in tree_leaves(ctx.op_output):  # what the block keeps, alive until its backward
                kept.count(output)
        return decision

    def counting_inputs(function, selective: bool):
        def checkpointed(block_forward, *args, **kwargs):  # the forward only: backward recomputes block_forward
            for tensor in tree_leaves((args, kwargs)):
                kept.count(tensor)
            kept.selective_depth += selective
            try:
                return function(block_forward, *args, **kwargs)
            finally:
                kept.selective_depth -= selective

        return checkpointed

    student_mode, discriminator_mode = CHECKPOINTING[checkpointing]
    configure_checkpointing(module, student_mode, discriminator_mode, policy=counting_policy)
    for network, mode in ((module.pair.unet, student_mode), (module.discriminator, discriminator_mode)):
        for block in network.modules() if network is not None else ():
            if getattr(block, "gradient_checkpointing", False):
                block._gradient_checkpointing_func = counting_inputs(block._gradient_checkpointing_func, mode == "selective")
    data = cached_meta_batch(module, batch) if cached else meta_batch(module, batch, resolution)
    _KEPT = kept
    try:
        with (
            trainer_free(module, before_backward=kept.next_phase),
            mock.patch("torch.nn.functional.scaled_dot_product_attention", _flash_like_sdpa),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            module.training_step(data, 0)
    finally:
        _KEPT = None
    return max(kept.phases) / batch


def static_bytes(module, strategy: str, gpus: int) -> float:
    """Weights, gradients and Adam states per GPU: trainable weights in fp32 with fp32 gradients and
    two Adam moments (16 bytes each); DDP adds its gradient buckets (4) and autocast's bf16 copies (2);
    FSDP shards the 16 over the GPUs and gathers one block at a time in bf16 (two, with prefetch).
    Frozen weights (teacher, VAE, text encoders) in bf16 on every GPU."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    frozen = sum(p.numel() for p in module.parameters() if not p.requires_grad)
    if strategy == "ddp":
        return (16 + 4 + 2) * count + 2 * frozen
    largest_block = max(
        sum(p.numel() for p in block.parameters())
        for network in (module.pair.unet, module.discriminator) if network is not None
        for block in [*getattr(network, "down_blocks", []), *getattr(network, "up_blocks", []),
                      *getattr(getattr(network, "backbone", None), "down_blocks", [])]
    )
    return 16 * count / gpus + 2 * 2 * largest_block + 2 * frozen


def memory_table(resolution: int, model: str, gpus: int = 8) -> list[str]:
    """Rows per phase, checkpointing and strategy (the step is the same under both: the lean one)."""
    rows = ["| phase | checkpointing (student, D) | strategy | static GB | activations GB / sample | batch 4 GB | batch 8 GB |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for stage, loss, student in (("8to4", "cond_adv", "lora"), ("2to1", "uncond_adv", "full")):
        module = build_module(stage, loss, student, resolution, model)
        for checkpointing, modes in CHECKPOINTING.items():
            activations = activation_bytes(module, 1, resolution, checkpointing)
            for strategy in ("ddp", "fsdp"):
                static = static_bytes(module, strategy, gpus)
                name = "DDP" if strategy == "ddp" else f"FSDP x {gpus}"
                rows.append(
                    f"| {stage} {loss} {student} | {', '.join(modes)} | {name} | {static / GB:.1f} | "
                    f"{activations / GB:.2f} | {(static + 4 * activations) / GB:.1f} | {(static + 8 * activations) / GB:.1f} |"
                )
    return rows


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--model", default="sdxl", choices=["sdxl", "tiny"])
    parser.add_argument("--phases", nargs="*", default=None, help="stage:loss:student, e.g. 8to4:cond_adv:lora")
    parser.add_argument("--skip-memory", action="store_true", help="only the FLOPs table")
    parser.add_argument("--from-images", action="store_true", help="the step from images (data=folder and the "
                        "other image sources): the VAE encoder and text encoders run in every step")
    parser.add_argument("--checkpointing", choices=MODES, default=None, help="student.gradient_checkpointing and "
                        "discriminator.gradient_checkpointing (default: experiment=sdxl's, selective)")
    parser.add_argument("--no-shared-forward", action="store_true", help="discriminator.shared_forward=false: D "
                        "judges again in its own phase")
    parser.add_argument("--skip-overhead", action="store_true", help="not the toy's Lightning step beside a plain "
                        "loop (benchmarks/overhead.py, about a minute)")
    args = parser.parse_args(argv)
    extra = ()
    if args.checkpointing:
        extra += (f"student.gradient_checkpointing={args.checkpointing}", f"discriminator.gradient_checkpointing={args.checkpointing}")
    extra += ("discriminator.shared_forward=false",) if args.no_shared_forward else ()
    phases = [tuple(p.split(":")) for p in args.phases] if args.phases else PHASES
    batch, worst = 1, 0.0
    source = "from images" if args.from_images else "from a latent cache (data=cached)"
    source += f", {args.checkpointing or 'selective (experiment=sdxl)'} activation checkpointing"
    source += ", D judging in each phase" if args.no_shared_forward else ", the lean step (D's forward shared)"
    print(f"TFLOPs per sample, {args.model} architecture at {args.resolution} px, step {source} (FlopCounterMode, meta device)")
    print("| stage | loss | student | real step | minimum | ratio | minimum's terms |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for stage, loss, student in phases:
        module = build_module(stage, loss, student, args.resolution, args.model, extra)
        real = step_flops(module, batch, args.resolution, cached=not args.from_images) / batch
        terms = {name: value / batch for name, value in minimum_flops(module, batch).items()}
        minimum = sum(terms.values())
        ratio = real / minimum
        worst = max(worst, ratio)
        detail = ", ".join(f"{name} {value / 1e12:.1f}" for name, value in terms.items())
        print(f"| {stage} | {loss} | {student} | {real / 1e12:.1f} | {minimum / 1e12:.1f} | {ratio:.2f} | {detail} |", flush=True)
    if not args.skip_memory:
        print(f"\nMemory per GPU (GB), {args.model} architecture at {args.resolution} px, Adam, bf16 autocast "
              "(static: counted from the weights; activations: what the real step keeps for backward)")
        print("\n".join(memory_table(args.resolution, args.model)))
    if not args.skip_overhead:
        from lightning_sdxl.benchmarks import overhead

        print("\n" + overhead.report(overhead.measure(40, []), []))
    print(f"max FLOPs ratio to the method's minimum: {worst:.2f}")
    return worst


if __name__ == "__main__":
    main()
