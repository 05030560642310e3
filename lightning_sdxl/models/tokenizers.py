"""Offline CLIP tokenizers: SDXL's BPE vocabulary from open_clip's bundled copy (no hub access)."""

from __future__ import annotations

from open_clip.tokenizer import SimpleTokenizer
from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
# open_clip spells CLIP's special tokens differently from transformers' CLIPTokenizer.
_SPECIAL_TOKENS = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}


def offline_clip_tokenizer(pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """SDXL's CLIP tokenizer, built from the vocabulary that ships inside open_clip.

    Built from the in-memory vocabulary and merge tuples: building it from vocab/merges file
    paths gave degenerate ids with transformers 5 (docs/MEASUREMENTS.md).

    Args:
        pad_token: "<|endoftext|>" for SDXL's tokenizer 1, "!" for tokenizer 2.
    """
    bpe = SimpleTokenizer()
    vocab = {_SPECIAL_TOKENS.get(token, token): index for token, index in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda item: item[1])]
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_MAX_LENGTH
    )
    check_tokenizer(tokenizer, "open_clip's bundled vocabulary")
    return tokenizer


def check_tokenizer(tokenizer: CLIPTokenizer, source: str) -> None:
    """Fail loudly on a degenerate tokenizer (offline hub loads can return a 2-token one)."""
    ids = tokenizer("a red circle").input_ids
    if len(tokenizer) < 1000 or len(set(ids)) < 4:
        raise RuntimeError(
            f"The CLIP tokenizer loaded from {source} is degenerate ({len(tokenizer)} tokens, "
            f"'a red circle' -> {ids}): check the folder's tokenizer files."
        )
