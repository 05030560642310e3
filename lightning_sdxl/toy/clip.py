"""The toy world's CLIP-score model: a tiny OpenCLIP (a custom open_clip config) trained
contrastively on toy image-caption pairs with open_clip's own `ClipLoss`.

It loads through `lightning_sdxl.metrics.OpenCLIPScorer` exactly as ViT-g-14 does on real runs
(`model_name=toy-clip`, `model_config=<the JSON>`, `pretrained=<the safetensors>`).

What it is trained on: 32 px images of `ToyWorld(32, seed=0, world=...)` with their captions.
  - "simple" world (conf/metrics/toy.yaml, assets/toy-metrics): captions name shape, colour,
    quadrant and background ("a large red circle at the top left on a white background").
  - "open" world (conf/metrics/toy_open.yaml, assets/toy-metrics-open): captions name only the
    colour and the background texture ("a red shape on a striped background"), so its score
    rewards the right colour and texture and is indifferent to the free shape, quadrant and phase.

Regenerate (the architecture JSON is written beside the weights):
  python -m lightning_sdxl.toy.clip                # simple world -> assets/toy-metrics
  python -m lightning_sdxl.toy.clip --world open   # open world -> assets/toy-metrics-open
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import open_clip
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch.utils.data import DataLoader

from lightning_sdxl import ASSETS_DIR
from lightning_sdxl.data.toy_world import WORLDS, ToyWorld
from lightning_sdxl.io import atomic_path, save_weights
from lightning_sdxl.toy.feature_net import assets_dir

MODEL_NAME = "toy-clip"
WEIGHTS_NAME = "toy_clip.safetensors"
CONFIG_FILE = ASSETS_DIR / "toy-metrics" / f"{MODEL_NAME}.json"
WEIGHTS_FILE = ASSETS_DIR / "toy-metrics" / WEIGHTS_NAME
# 32 px images in 4 px patches; a 32-wide text tower (its 49,408-token embedding dominates the file).
TOY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "head_width": 32, "patch_size": 4},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


class ContrastiveModule(L.LightningModule):
    def __init__(self, model: torch.nn.Module, lr: float = 1e-3, total_steps: int = 1000):
        super().__init__()
        self.model, self.lr, self.total_steps = model, lr, total_steps
        self.tokenizer = open_clip.get_tokenizer(MODEL_NAME)
        self.loss = ClipLoss()
        preprocess = open_clip.get_model_preprocess_cfg(model)
        self.register_buffer("mean", torch.tensor(preprocess["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocess["std"]).view(1, 3, 1, 1), persistent=False)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        # The scorer's preprocessing at native size: [0, 1] images normalised with the model's mean/std.
        images = ((batch["pixel_values"] / 2 + 0.5) - self.mean) / self.std
        out = self.model(images, self.tokenizer(batch["prompt"]))
        loss = self.loss(out["image_features"], out["text_features"], out["logit_scale"])
        self.log("clip/loss", loss)
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=0.1)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, self.lr, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def write_config(path: Path = CONFIG_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(TOY_CLIP_CONFIG, indent=2) + "\n")
    open_clip.add_model_config(path)
    return path


def train_toy_clip(steps: int = 1500, batch_size: int = 64, seed: int = 0, world: str = "simple") -> torch.nn.Module:
    """Train the tiny OpenCLIP on `world`'s image-caption pairs (seeded)."""
    with tempfile.TemporaryDirectory() as folder:
        write_config(Path(folder) / f"{MODEL_NAME}.json")  # registers the architecture
    L.seed_everything(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None, output_dict=True)
    data = ToyWorld(32, size=steps * batch_size, seed=seed, world=world)
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, gradient_clip_val=1.0,
    )
    trainer.fit(ContrastiveModule(model, total_steps=steps), DataLoader(data, batch_size=batch_size, drop_last=True))
    return model.eval().requires_grad_(False)


@torch.no_grad()
def held_out_scores(model: torch.nn.Module, world: ToyWorld, num_images: int = 512) -> dict[str, float]:
    """On items 0..num_images-1 of `world`: "caption_accuracy", how often an image's own caption
    scores highest among all distinct captions of the set; "matched" and "shuffled", the mean
    CLIP score (100 x cos) with its own caption and with the next item's."""
    model = model.eval()
    preprocess = open_clip.get_model_preprocess_cfg(model)
    mean, std = (torch.tensor(preprocess[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    images = torch.stack([world[i]["pixel_values"] for i in range(num_images)]) / 2 + 0.5
    captions = [world.scene(i).caption for i in range(num_images)]
    vocabulary = sorted(set(captions))
    image_features = F.normalize(model.encode_image((images - mean) / std), dim=-1)
    text_features = F.normalize(model.encode_text(open_clip.get_tokenizer(MODEL_NAME)(vocabulary)), dim=-1)
    scores = 100 * image_features @ text_features.T  # (num_images, captions)
    truth = torch.tensor([vocabulary.index(c) for c in captions])
    shuffled = truth.roll(-1)
    rows = torch.arange(num_images)
    return {
        "caption_accuracy": float((scores.argmax(1) == truth).float().mean()),
        "matched": float(scores[rows, truth].mean()), "shuffled": float(scores[rows, shuffled].mean()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train and write the toy CLIP-score model.")
    parser.add_argument("--world", default="simple", choices=sorted(WORLDS))
    parser.add_argument("--out", type=Path, default=None, help="default: <assets_dir(world)>/" + WEIGHTS_NAME)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    out = args.out or assets_dir(args.world) / WEIGHTS_NAME
    start = time.perf_counter()
    model = train_toy_clip(args.steps, world=args.world)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")
    held_out = held_out_scores(model, ToyWorld(32, seed=1, world=args.world))
    print("held-out (world seed 1, 512 images):", {k: round(v, 3) for k, v in held_out.items()})
    config = write_config(out.parent / f"{MODEL_NAME}.json")
    save_weights(model.state_dict(), out, torch.float16)
    print("written:", out, config)


if __name__ == "__main__":
    main()
