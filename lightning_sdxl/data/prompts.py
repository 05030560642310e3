"""Fixed validation prompts, each with the seed of its initial noise."""

from __future__ import annotations

from torch.utils.data import Dataset


class PromptDataset(Dataset):
    """Prompt and seed pairs; default collate gives a list of prompts and an int64 seed tensor.

    Args:
        prompts: the validation prompts.
        seeds: one noise seed per prompt.
    """

    def __init__(self, prompts: list[str], seeds: list[int]) -> None:
        if len(prompts) != len(seeds):
            raise ValueError(
                f"PromptDataset needs one seed per prompt, got {len(prompts)} prompts and "
                f"{len(seeds)} seeds"
            )
        self.prompts = [str(p) for p in prompts]
        self.seeds = [int(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "seed": self.seeds[i]}
