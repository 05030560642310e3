"""Under DDP each backward all-reduces only its own optimizer's gradients (gradient_reduction.py)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.overrides.distributed import prepare_for_backward
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_sdxl.gradient_reduction import GradientReduction, reduce_owned_buckets


@pytest.fixture
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


class Pair(nn.Module):
    """A generator and a discriminator in one DDP wrapper, stepped as the LightningModule steps them:
    both backwards inside DDP's one forward, each prepared as Lightning's `manual_backward` does."""

    def __init__(self, hooked: bool):
        super().__init__()
        self.generator, self.discriminator = nn.Linear(64, 64), nn.Linear(64, 1)
        self.hooked, self.state = hooked, GradientReduction()
        self.wrapper: DistributedDataParallel | None = None

    def backward(self, loss: torch.Tensor, owner: nn.Module) -> None:
        prepare_for_backward(self.wrapper, loss)
        if not self.hooked:  # owner None: DDP's averaging all-reduce of every bucket
            loss.backward()
            return
        with self.state.only(owner.parameters()):
            loss.backward()

    def forward(self, x):
        self.discriminator.requires_grad_(False)  # the generator's step: D toggled off
        self.backward(self.discriminator(self.generator(x)).mean(), self.generator)
        self.discriminator.requires_grad_(True)
        self.generator.requires_grad_(False)  # the discriminator's step on a detached fake
        self.backward(self.discriminator(self.generator(x).detach()).mean(), self.discriminator)
        self.generator.requires_grad_(True)


def test_each_backward_reduces_its_own_optimizers_weights_once(process_group):
    counted = {}
    for hooked in (True, False):
        pair = Pair(hooked)
        # DDP's first bucket (1 MiB) holds both modules' weights: the hook reduces a mixed bucket's slices
        pair.wrapper = DistributedDataParallel(pair, find_unused_parameters=True)
        pair.wrapper.register_comm_hook(pair.state, reduce_owned_buckets)
        pair.wrapper(torch.randn(8, 64))
        counted[hooked] = pair.state.reduced_elements
    total = sum(p.numel() for p in Pair(True).parameters())
    assert counted == {True: total, False: 2 * total}
