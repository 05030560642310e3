"""The text conditions a run from a latent cache still needs, stored with the cache so that it loads
no text encoder (issue 14): the validation prompts' conditions (what `DistillationModule.condition`
gives for them) and the empty prompt's embeddings (the negative of the teacher's classifier-free
guidance, stage 128 to 32)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lightning_sdxl.data.latent_cache import CONDITIONS_FILE
from lightning_sdxl.models.conditioning import SDXLCondition
from lightning_sdxl.models.text_encoding import SDXLTextEncoder, build_condition


def write_conditions(folder: Path, text_encoder: SDXLTextEncoder, prompts: list[str], resolution: int) -> None:
    """Encode `prompts` as generation encodes them (uncropped, at `resolution`) and the empty prompt."""
    condition = build_condition(text_encoder, prompts, (resolution, resolution))
    empty_embeds, empty_pooled = text_encoder.encode_unconditional(1)
    tensors = {
        "prompt_embeds": condition.prompt_embeds, "pooled_prompt_embeds": condition.pooled_prompt_embeds,
        "add_time_ids": condition.add_time_ids, "empty_prompt_embeds": empty_embeds, "empty_pooled_prompt_embeds": empty_pooled,
    }
    save_file({key: value.detach().cpu().contiguous() for key, value in tensors.items()}, str(folder / CONDITIONS_FILE))


class StoredConditions:
    """`condition(prompts)` and the empty prompt's embeddings from a cache's stored tensors, in float32 as
    the module's own text path returns them.

    Args:
        cache_dir: the latent cache folder.
        prompts: the prompts stored, in the order `write_conditions` encoded them.
    """

    def __init__(self, cache_dir: str | Path, prompts: list[str]):
        # Its presence is checked with the cache before models load (latent_cache.check_cache_fits).
        self.tensors = {key: value.float() for key, value in load_file(str(Path(cache_dir) / CONDITIONS_FILE)).items()}
        self.rows = {prompt: row for row, prompt in enumerate(prompts)}

    def condition(self, prompts: list[str], device: torch.device) -> SDXLCondition:
        missing = [prompt for prompt in prompts if prompt not in self.rows]
        if missing:
            raise KeyError(
                f"A run from a latent cache has no text encoders and knows only the cache's validation prompts; "
                f"{missing[:2]} is not one. Load the checkpoint with DistillationModule.for_inference to sample others."
            )
        rows = torch.tensor([self.rows[prompt] for prompt in prompts])
        return SDXLCondition(
            *(self.tensors[key][rows].to(device) for key in ("prompt_embeds", "pooled_prompt_embeds", "add_time_ids"))
        )

    def encode_unconditional(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored empty-prompt embeddings, repeated: `SDXLTextEncoder.encode_unconditional`'s
        contract, so `text_encoding.unconditional_like` takes this object in the encoder's place."""
        return (self.tensors["empty_prompt_embeds"].expand(batch_size, -1, -1),
                self.tensors["empty_pooled_prompt_embeds"].expand(batch_size, -1))
