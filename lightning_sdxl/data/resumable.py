"""A sampler that resumes where training stopped: exact resume for map-style datasets.

Lightning restarts an interrupted epoch from its first item (its DistributedSampler has no
position), so a resumed run re-read data the interrupted one had trained on and ended different
from an uninterrupted run (issue 15). This sampler shards the epoch itself (rank r takes items
r, r + W, r + 2W, ... of the epoch's order, as DistributedSampler with drop_last) and, for the epoch
a run resumes in, skips the batches already trained, which the datamodule reads from the restored
module (`batches_trained`, lightning_sdxl/steps.py). Trainers built by train.py set
`use_distributed_sampler=False` so Lightning does not wrap it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """One rank's indices of each epoch, starting after `start_batch` batches (over all epochs).

    Args:
        size: items in the dataset.
        batch_size: items per batch on one rank.
        shuffle: a seeded permutation per epoch (seed + epoch); False keeps index order.
        seed: the shuffle's seed.
        start_batch: batches this rank has already trained (0 for a fresh run).
        rank, world_size: this process's place among the data-parallel ranks.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int = 0, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1):
        self.per_rank_batches = size // (world_size * batch_size)
        if self.per_rank_batches < 1:
            raise ValueError(
                f"{size} items cannot fill one batch of {batch_size} on each of {world_size} ranks: add data "
                "or lower data.batch_size."
            )
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = start_batch // self.per_rank_batches
        self.resume_epoch, self.skip_batches = self.epoch, start_batch % self.per_rank_batches

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this at every epoch start (its restored current_epoch on resume)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank_batches * self.batch_size  # a full epoch: Lightning's counters resume mid-epoch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(self.size)
        mine = order[self.rank : self.per_rank_batches * self.batch_size * self.world_size : self.world_size]
        skip = 0
        if self.epoch == self.resume_epoch:  # only the first pass over the resumed epoch skips
            skip, self.skip_batches = self.skip_batches * self.batch_size, 0
        return iter(mine[skip:].tolist())
