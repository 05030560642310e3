"""lightning_sdxl/activation_checkpointing.py: modes, and a selective block's gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_sdxl.activation_checkpointing import checkpoint_function, checkpointing_mode


def test_checkpointing_modes_and_the_former_booleans():
    assert [checkpointing_mode(v) for v in (True, False, None, "selective")] == ["full", "none", "none", "selective"]
    with pytest.raises(ValueError, match="none, selective, full"):
        checkpointing_mode("partial")


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.linear, self.out = nn.LayerNorm(8), nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x):
        return x + self.out(torch.nn.functional.gelu(self.linear(self.norm(x))))


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_a_checkpointed_block_gives_the_same_gradients_over_two_backwards(mode):
    """Two backward passes through one forward (the lean step's generator gradient, then D's loss):
    torch's own selective checkpointing refuses the second; this project's keeps its entries."""
    torch.manual_seed(0)
    block, x = Block(), torch.randn(4, 8)
    expected = []
    for function in (lambda b, *a: b(*a), checkpoint_function(mode)):
        block.zero_grad()
        leaf = x.clone().requires_grad_(True)
        y = function(block, leaf)
        (input_gradient,) = torch.autograd.grad(y.square().sum(), leaf, retain_graph=True)
        y.sum().backward()
        expected.append((input_gradient, [p.grad.clone() for p in block.parameters()]))
    (plain_input, plain_weights), (checkpointed_input, checkpointed_weights) = expected
    torch.testing.assert_close(checkpointed_input, plain_input)
    for got, want in zip(checkpointed_weights, plain_weights):
        torch.testing.assert_close(got, want)
