"""A killed run resumed from its last checkpoint ends bit-identical to the uninterrupted run: the
data continues with the next unseen items and the RNG states are restored (issue 15)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose_config

from lightning_sdxl.data.resumable import ResumableSampler

RUN = ("steps=6", "checkpoint.every_n_steps=2", "validation.every_n_steps=3", "logger=none", "data.batch_size=2")


class CrashAt(L.Callback):
    """Raises before batch `at` (a kill between checkpoints)."""

    def __init__(self, at: int):
        self.at = at

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.lightning_module.batches_trained == self.at:
            raise RuntimeError("killed")


class RecordPrompts(L.Callback):
    def __init__(self):
        self.prompts = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.prompts.append(list(batch["prompt"]))


def final_state(run: Path) -> dict:
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    return {**checkpoint["state_dict"], **{f"optimizer{i}.{k}": v for i, o in enumerate(checkpoint["optimizer_states"])
                                          for k, v in o["state"].items() if isinstance(v, torch.Tensor)}}


@pytest.mark.parametrize("loss", ["uncond_adv", pytest.param("mse", marks=pytest.mark.slow)])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(loss, tmp_path):
    from lightning_sdxl.train import train

    def make_config(*overrides: str):
        *settings, folder = overrides
        return compose_config(list(settings), tmp_path / folder)

    whole_prompts, resumed_prompts = RecordPrompts(), RecordPrompts()
    whole = make_config(f"loss={loss}", *RUN, "whole")
    train(whole, [whole_prompts])

    killed = make_config(f"loss={loss}", *RUN, "killed")
    with pytest.raises(RuntimeError, match="killed"):
        train(killed, [CrashAt(at=5), resumed_prompts])  # checkpoints after batches 2 and 4; batch 5 lost
    train(make_config(f"loss={loss}", *RUN, "ckpt_path=last", "killed"), [resumed_prompts])

    # The resumed run re-reads batch 5 (trained but not checkpointed) and goes on with 6.
    assert resumed_prompts.prompts == whole_prompts.prompts[:5] + whole_prompts.prompts[4:]
    expected, got = final_state(tmp_path / "whole"), final_state(tmp_path / "killed")
    assert expected.keys() == got.keys() and len(expected) > 0
    different = [key for key in expected if not torch.equal(expected[key], got[key])]
    assert not different, f"{len(different)} of {len(expected)} tensors differ, e.g. {different[:3]}"


def test_sampler_shards_ranks_without_overlap_and_skips_trained_batches():
    ranks = [list(ResumableSampler(40, batch_size=4, shuffle=True, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 20 and not set(ranks[0]) & set(ranks[1])
    resumed = ResumableSampler(40, batch_size=4, shuffle=True, seed=3, start_batch=2, rank=1, world_size=2)
    assert list(resumed) == ranks[1][8:]  # rank 1 had trained 2 batches of 4
    resumed.set_epoch(1)  # the next epoch is whole, in its own order
    fresh = ResumableSampler(40, batch_size=4, shuffle=True, seed=3, rank=1, world_size=2)
    fresh.set_epoch(1)
    assert list(resumed) == list(fresh) != ranks[1]
    later = ResumableSampler(40, batch_size=4, shuffle=True, seed=3, start_batch=7, rank=0, world_size=2)
    assert later.epoch == 1 and len(list(later)) == 12  # 5 batches per rank per epoch: 2 into epoch 1, 3 left
    with pytest.raises(ValueError, match="cannot fill one batch"):
        ResumableSampler(7, batch_size=4, shuffle=False, world_size=2)
