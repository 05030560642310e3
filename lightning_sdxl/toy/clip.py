"""The toy world's CLIP-score model: a tiny OpenCLIP (a custom open_clip config) trained
contrastively on toy image-caption pairs with open_clip's own `ClipLoss`.

It loads through `lightning_sdxl.metrics.OpenCLIPScorer` exactly as ViT-g-14 does on real runs
(`model_name=toy-clip`, `model_config=<the JSON>`, `pretrained=<the safetensors>`).
Regenerate: python -m lightning_sdxl.toy.clip
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import lightning as L
import open_clip
import torch
from open_clip.loss import ClipLoss
from torch.utils.data import DataLoader

from lightning_sdxl import ASSETS_DIR
from lightning_sdxl.data.toy_world import ToyWorld
from lightning_sdxl.io import atomic_path, save_weights

MODEL_NAME = "toy-clip"
CONFIG_FILE = ASSETS_DIR / "toy-metrics" / f"{MODEL_NAME}.json"
WEIGHTS_FILE = ASSETS_DIR / "toy-metrics" / "toy_clip.safetensors"
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


def train_toy_clip(steps: int = 1500, batch_size: int = 64, seed: int = 0) -> torch.nn.Module:
    """Train the tiny OpenCLIP on simple-world image-caption pairs (seeded)."""
    with tempfile.TemporaryDirectory() as folder:
        write_config(Path(folder) / f"{MODEL_NAME}.json")  # registers the architecture
    L.seed_everything(seed)
    model = open_clip.create_model(MODEL_NAME, pretrained=None, output_dict=True)
    world = ToyWorld(32, size=steps * batch_size, seed=seed, world="simple")
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, gradient_clip_val=1.0,
    )
    trainer.fit(ContrastiveModule(model, total_steps=steps), DataLoader(world, batch_size=batch_size, drop_last=True))
    return model.eval().requires_grad_(False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train and write the toy CLIP-score model.")
    parser.add_argument("--out", type=Path, default=WEIGHTS_FILE)
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args(argv)
    model = train_toy_clip(args.steps)
    config = write_config(args.out.parent / f"{MODEL_NAME}.json")
    save_weights(model.state_dict(), args.out, torch.float16)
    print("written:", args.out, config)


if __name__ == "__main__":
    main()
