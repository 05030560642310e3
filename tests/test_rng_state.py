"""One torch stream per rank (callbacks/rng_state.py): ranks of a data-parallel run draw different
timesteps and noise, and a resume gives each rank its own stream back."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from lightning_sdxl.callbacks import rng_state
from lightning_sdxl.callbacks.rng_state import RngStateCheckpoint


def trainer(rank: int, world: int) -> SimpleNamespace:
    return SimpleNamespace(global_rank=rank, world_size=world)


def draws_at_start(rank: int, world: int, loaded: dict | None = None) -> torch.Tensor:
    """What a rank draws first in training, every rank having been seeded alike (seed_everything)."""
    torch.manual_seed(7)
    callback = RngStateCheckpoint()
    if loaded is not None:
        callback.load_state_dict(loaded)
    callback.on_train_start(trainer(rank, world), None)
    return torch.rand(4)


def test_ranks_of_a_fresh_run_draw_differently_and_rank_zero_keeps_the_run_stream():
    single = draws_at_start(0, 1)
    ranks = [draws_at_start(rank, 4) for rank in range(4)]
    assert torch.equal(ranks[0], single)
    assert len({tuple(r.tolist()) for r in ranks}) == 4
    assert torch.equal(draws_at_start(2, 4), ranks[2])  # deterministic per rank


def test_a_checkpoint_holds_every_ranks_state_and_gives_each_its_own_back(monkeypatch):
    states = []
    for rank in range(2):  # two ranks part-way through training, each on its own stream
        torch.manual_seed(100 + rank)
        torch.rand(3)
        states.append(rng_state.collect_rng_states())
    expected = []
    for rank in range(2):
        rng_state.restore_rng_states(states[rank])
        expected.append(torch.rand(4))

    def all_gather_object(out, obj):  # what torch.distributed gives rank 0 of 2
        out[:] = states

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    callback = RngStateCheckpoint()
    callback.setup(trainer(0, 2), None, "fit")
    saved = callback.state_dict()
    assert len(saved["per_rank"]) == 2
    for rank in range(2):
        assert torch.equal(draws_at_start(rank, 2, saved), expected[rank])
    # On another number of ranks: rank 0 continues its stream, the others get streams of their own.
    on_three = [draws_at_start(rank, 3, saved) for rank in range(3)]
    assert torch.equal(on_three[0], expected[0]) and len({tuple(r.tolist()) for r in on_three}) == 3


def test_a_single_process_checkpoint_resumes_exactly():
    torch.manual_seed(3)
    torch.rand(5)
    callback = RngStateCheckpoint()
    saved = callback.state_dict()
    expected = torch.rand(4)
    assert torch.equal(draws_at_start(0, 1, saved), expected)
