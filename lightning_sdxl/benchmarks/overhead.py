"""Lightning's overhead on the training step: the toy default's step through `train.py` (Trainer,
callbacks, logging, the module's bookkeeping) beside a plain PyTorch loop of the same maths,
interleaved batch by batch in one process.

    python -m lightning_sdxl.benchmarks.overhead [--batches 40] [overrides ...]

The plain loop is what a researcher would write by hand: the module's own jump, judgement and
losses (so the maths is the same), two `torch.optim` optimizers, `zero_grad / backward / clip /
step`; no Trainer, no logging, no non-finite guard. The Lightning side runs as
`python train.py` does (its callbacks and logger), with validation and checkpoints out of range. After every Lightning batch
(timed from the end of the previous one, so its data loading and hooks count) one plain batch runs
on the same module from its own loader. Interleaving puts both under the same machine load; the
median of the per-pair ratios is reported.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch

from lightning_sdxl.batch_randomness import BatchRandomness
from lightning_sdxl.module import batch_length


def _step(module, optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip := module.hparams.optim["gradient_clip_val"]:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip)
    optimizer.step()


def plain_step(module, optimizers: list[torch.optim.Optimizer], batch: dict) -> None:
    """One batch of the lean step written as a plain loop (module docstring)."""
    randomness = BatchRandomness(batch_length(batch))
    x0, condition = module.latents_and_condition(batch, randomness)
    jump = module.jump(x0, condition, randomness)
    regression = module.loss.regression_term(jump.x_next_fake, jump.x_next_real)
    regression = 0.0 if regression is None else regression
    if not module.adversarial:
        _step(module, optimizers[0], regression)
        return
    generator, discriminator = optimizers
    x_real, x_fake, t_judge = module.judged(jump, randomness)
    fake_input = x_fake.detach().requires_grad_(True)
    logits_fake, start_features = module.discriminator.judge_fake(
        jump.x_t, jump.t, fake_input.view_as(fake_input), t_judge, jump.condition
    )
    adversarial, _ = module.loss.adversarial_term(logits_fake)
    (gradient,) = torch.autograd.grad(adversarial, fake_input, retain_graph=True)
    _step(module, generator, (x_fake * gradient).sum() + regression)
    logits_real = module.discriminator.judge_real(start_features, x_real, t_judge, jump.condition)
    _step(module, discriminator, module.loss.discriminator_loss(logits_real, logits_fake))


class Interleaved(L.Callback):
    """Times each Lightning batch and runs one plain batch after it (timed apart)."""

    def __init__(self, warmup: int):
        self.warmup, self.lightning, self.plain = warmup, [], []
        self.mark: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        optimizers = pl_module.configure_optimizers()
        self.optimizers = optimizers[0] if isinstance(optimizers, tuple) else optimizers
        self.batches = iter(trainer.datamodule.train_dataloader())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.mark is None:
            self.mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        lightning = time.perf_counter() - self.mark
        start = time.perf_counter()  # the plain batch's loading counts, as the Lightning one's does
        batch = trainer.strategy.batch_to_device(next(self.batches))
        plain_step(pl_module, self.optimizers, batch)
        plain = time.perf_counter() - start
        if batch_idx >= self.warmup:
            self.lightning.append(lightning)
            self.plain.append(plain)
        self.mark = time.perf_counter()


def measure(batches: int, overrides: list[str], warmup: int = 3) -> dict[str, float]:
    from lightning_sdxl.run_config import compose_train_config
    from lightning_sdxl.train import train

    timer = Interleaved(warmup)
    with tempfile.TemporaryDirectory(prefix="overhead_") as folder:
        cfg = compose_train_config([
            f"steps={batches + warmup}", f"output_dir={folder}", "trainer.num_sanity_val_steps=0",
            f"validation.every_n_steps={10 * (batches + warmup)}", f"checkpoint.every_n_steps={10 * (batches + warmup)}",
            *overrides,
        ])
        train(cfg, extra_callbacks=[timer])
    ratios = [a / b for a, b in zip(timer.lightning, timer.plain)]
    return {"pairs": len(ratios), "lightning_s": statistics.median(timer.lightning),
            "plain_s": statistics.median(timer.plain), "ratio": statistics.median(ratios)}


def report(result: dict[str, float], overrides: list[str]) -> str:
    return (f"Lightning step vs a plain loop ({' '.join(overrides) or 'the toy default'}, {result['pairs']} interleaved "
            f"batch pairs, medians): {result['lightning_s']:.3f} s vs {result['plain_s']:.3f} s per batch, "
            f"ratio {result['ratio']:.3f}")


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40, help="measured batch pairs (after 3 of warm-up)")
    parser.add_argument("overrides", nargs="*", help="train.py overrides (default: the toy default)")
    args = parser.parse_args(argv)
    result = measure(args.batches, args.overrides)
    print(report(result, args.overrides))
    return result["ratio"]


if __name__ == "__main__":
    main()
