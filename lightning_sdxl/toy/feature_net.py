"""The toy world's FID network: a small CNN trained to classify the toy attributes.

Its global-average-pooled last conv features (`num_features` wide) play Inception's pool features
(METHOD.md 6): loaded through `lightning_sdxl.metrics.LocalFeatures`, at 32 px for FID-Whole and,
being fully convolutional, on the 16 px native centre crop for FID-Patch (conf/metrics/toy.yaml).
Regenerate: python -m lightning_sdxl.toy.feature_net
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_sdxl import ASSETS_DIR
from lightning_sdxl.data.toy_world import WORLDS, ToyWorld
from lightning_sdxl.io import save_weights

FEATURES_FILE = ASSETS_DIR / "toy-metrics" / "toy_features.safetensors"
ATTRIBUTES = ("kind", "colour", "position", "background")


def _attribute_words(world: str) -> dict[str, tuple[str, ...]]:
    vocabulary = WORLDS[world]
    return {
        "kind": vocabulary.shapes, "colour": vocabulary.colours,
        "position": vocabulary.positions, "background": vocabulary.backgrounds,
    }


def _block(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1),
        nn.GroupNorm(8, channels_out),
        nn.SiLU(),
    )


class ToyFeatureNet(nn.Module):
    """CNN over images in [0, 1] (any side >= 8): features (B, num_features), and attribute logits.

    Args:
        num_features: width of the pooled features.
        world: the toy world whose attributes the heads classify.
    """

    def __init__(self, num_features: int = 128, world: str = "simple"):
        super().__init__()
        self.num_features = num_features
        self.body = nn.Sequential(
            _block(3, 32, 1), _block(32, 64, 2), _block(64, 64, 1), _block(64, 128, 2),
            _block(128, num_features, 2),
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(num_features, len(words)) for name, words in _attribute_words(world).items()}
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, num_features), the spatial mean of the last block."""
        return self.body(images * 2 - 1).mean(dim=(2, 3))

    def classify(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self(images)
        return {name: head(features) for name, head in self.heads.items()}


class _LabelledWorld(Dataset):
    """Toy images in [0, 1] with their attribute indices."""

    def __init__(self, world: ToyWorld):
        self.world, self.words = world, _attribute_words(world.world)

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, i: int) -> dict:
        (shape,) = self.world.scene(i).shapes
        values = {"kind": shape.kind, "colour": shape.colour, "position": shape.position,
                  "background": self.world.scene(i).background}
        labels = {name: self.words[name].index(values[name]) for name in ATTRIBUTES}
        return {"images": self.world[i]["pixel_values"] / 2 + 0.5, **labels}


class FeatureNetModule(L.LightningModule):
    def __init__(self, network: ToyFeatureNet, lr: float = 2e-3, total_steps: int = 1000):
        super().__init__()
        self.network, self.lr, self.total_steps = network, lr, total_steps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.network.classify(batch["images"])
        losses = {name: F.cross_entropy(logits[name], batch[name]) for name in ATTRIBUTES}
        accuracy = {f"accuracy/{n}": (logits[n].argmax(1) == batch[n]).float().mean() for n in ATTRIBUTES}
        self.log_dict(accuracy)
        return sum(losses.values())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, self.lr, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


@torch.no_grad()
def attribute_accuracy(network: ToyFeatureNet, world: ToyWorld, num_images: int = 512) -> dict[str, float]:
    """Held-out accuracy per attribute on items 0..num_images-1 of `world`."""
    data = _LabelledWorld(world)
    batch = next(iter(DataLoader(torch.utils.data.Subset(data, range(num_images)), batch_size=num_images)))
    logits = network.eval().classify(batch["images"])
    return {name: float((logits[name].argmax(1) == batch[name]).float().mean()) for name in ATTRIBUTES}


def train_feature_net(steps: int = 800, batch_size: int = 64, seed: int = 0, world: str = "simple") -> ToyFeatureNet:
    """Train `ToyFeatureNet` on the toy world at 32 px (seeded; items from world seed `seed`)."""
    L.seed_everything(seed)
    network = ToyFeatureNet(world=world)
    data = _LabelledWorld(ToyWorld(32, size=steps * batch_size, seed=seed, world=world))
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
    )
    trainer.fit(FeatureNetModule(network, total_steps=steps), DataLoader(data, batch_size=batch_size, drop_last=True))
    return network.eval().requires_grad_(False)


def save_feature_net(network: ToyFeatureNet, path: Path = FEATURES_FILE) -> Path:
    return save_weights(network.state_dict(), path, torch.float16)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train and write the toy FID feature network.")
    parser.add_argument("--out", type=Path, default=FEATURES_FILE)
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args(argv)
    network = train_feature_net(args.steps)
    held_out = attribute_accuracy(network, ToyWorld(32, seed=1, world="simple"))
    print("held-out accuracy:", {k: round(v, 3) for k, v in held_out.items()})
    print("written:", save_feature_net(network, args.out))


if __name__ == "__main__":
    main()
