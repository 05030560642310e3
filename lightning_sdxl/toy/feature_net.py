"""The toy world's FID network: a small CNN trained to recognise what a toy world draws.

Its global-average-pooled last conv features (`num_features` wide) play Inception's pool features
(METHOD.md 6): loaded through `lightning_sdxl.metrics.LocalFeatures`, at 32 px for FID-Whole and,
being fully convolutional, on the 16 px native centre crop for FID-Patch.

What it is trained on (items of `ToyWorld(32, seed=0, world=...)`, one pass, nothing repeated):
  - "simple" world (conf/metrics/toy.yaml, assets/toy-metrics): whole 32 px images only, four
    classification heads: shape kind, colour, quadrant, background.
  - "open" world (conf/metrics/toy_open.yaml, assets/toy-metrics-open), where captions leave the
    shape, its quadrant and the background texture's phase free, so a blurry student is possible:
    on whole 32 px images the same four heads (background = texture kind) plus a texture-phase
    head; and on a random 16 x 16 native-resolution crop of each image (the FID-Patch view; a crop
    always shows background texture) a texture-kind head and a texture-phase head. The phase heads
    regress (cos, sin) of 2 pi x the phase (`phase_target`), so the features encode where the
    texture's sharp edges lie. Half the images (and so their crops) are Gaussian-blurred first
    (sigma 0.25-1.5 px) and a blur head on each view regresses sigma (0 when sharp): without it
    the features read every attribute through blur and FID hardly moved when images blurred
    (FID-Patch, sharp vs sharp 3.1, vs sigma 1 px 3.6; with it 2.0 vs 18).

Regenerate (held-out accuracies are printed):
  python -m lightning_sdxl.toy.feature_net                # simple world -> assets/toy-metrics
  python -m lightning_sdxl.toy.feature_net --world open   # open world -> assets/toy-metrics-open
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms.functional import gaussian_blur

from lightning_sdxl import ASSETS_DIR
from lightning_sdxl.data.toy_world import TEXTURE_PERIOD, TEXTURES, WORLDS, ToyWorld
from lightning_sdxl.io import save_weights

FEATURES_NAME = "toy_features.safetensors"
FEATURES_FILE = ASSETS_DIR / "toy-metrics" / FEATURES_NAME
ATTRIBUTES = ("kind", "colour", "position", "background")
RESOLUTION = 32  # the toy worlds' image side (the teacher's and the metrics')
CROP_SIZE = 16  # the FID-Patch view of conf/metrics/toy*.yaml: a native-resolution crop
PHASE_WIDTH = 4  # (cos, sin) of two phase angles, see phase_target
# Textured worlds: this fraction of training images is Gaussian-blurred, sigma uniform in BLUR_SIGMA
# pixels, and a "blur" head regresses sigma (0 when sharp). Without it the features learn to read
# kind, colour, quadrant, texture and phase through blur (GroupNorm also normalises away the
# contrast a blur removes) and FID barely moves when images blur.
BLUR_FRACTION = 0.5
BLUR_SIGMA = (0.25, 1.5)
BLUR_WEIGHT = 4.0  # the blur losses' weight against the other heads'


def assets_dir(world: str = "simple") -> Path:
    """Where a world's metric networks live: assets/toy-metrics (simple), toy-metrics-<world>."""
    return ASSETS_DIR / ("toy-metrics" if world == "simple" else f"toy-metrics-{world}")


def textured(world: str) -> bool:
    """Whether `world` draws phase-shifted textures as backgrounds (then the crop heads exist)."""
    return any(background in TEXTURES for background in WORLDS[world].backgrounds)


def _attribute_words(world: str) -> dict[str, tuple[str, ...]]:
    vocabulary = WORLDS[world]
    return {
        "kind": vocabulary.shapes, "colour": vocabulary.colours,
        "position": vocabulary.positions, "background": vocabulary.backgrounds,
    }


def phase_target(texture: str, phase: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the phase heads regress for a texture at `phase` (Scene.phase, fractions of a period).

    (cos 2 pi a, sin 2 pi a, cos 2 pi b, sin 2 pi b) with (a, b) the texture's own phase
    coordinates: dots (x, y); stripes (x, -), their y is meaningless and masked out; checks
    (x + y, x - y), as checks shifted by half a period on both axes are the same picture.

    Returns:
        (4,) target and (4,) mask (1 where the target is defined), float32.
    """
    x, y = phase
    if texture == "dots":
        a, b, mask = x, y, (1.0, 1.0, 1.0, 1.0)
    elif texture == "stripes":
        a, b, mask = x, 0.0, (1.0, 1.0, 0.0, 0.0)
    elif texture == "checks":
        a, b, mask = x + y, x - y, (1.0, 1.0, 1.0, 1.0)
    else:
        raise ValueError(f"unknown texture {texture!r}: expected one of {TEXTURES}")
    angles = (2 * math.pi * a, 2 * math.pi * b)
    target = (math.cos(angles[0]), math.sin(angles[0]), math.cos(angles[1]), math.sin(angles[1]))
    return torch.tensor(target, dtype=torch.float32), torch.tensor(mask, dtype=torch.float32)


def _block(channels_in: int, channels_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1),
        nn.GroupNorm(8, channels_out),
        nn.SiLU(),
    )


class ToyFeatureNet(nn.Module):
    """CNN over images in [0, 1] (any side >= 8): features (B, num_features), and head outputs.

    Heads on the pooled features: `heads` (whole 32 px images) classify the world's attributes
    (ATTRIBUTES); in a textured world they add "phase" (see `phase_target`) and "blur" (Gaussian
    sigma in pixels), and `crop_heads` (16 px native crops) hold "texture" (logits over the
    world's textures), "phase" and "blur".

    Args:
        num_features: width of the pooled features.
        world: the toy world whose attributes the heads classify (sets the heads' shapes).
    """

    def __init__(self, num_features: int = 128, world: str = "simple"):
        super().__init__()
        self.num_features, self.world = num_features, world
        self.body = nn.Sequential(
            _block(3, 32, 1), _block(32, 64, 2), _block(64, 64, 1), _block(64, 128, 2),
            _block(128, num_features, 2),
        )
        self.heads = nn.ModuleDict(
            {name: nn.Linear(num_features, len(words)) for name, words in _attribute_words(world).items()}
        )
        self.crop_heads = nn.ModuleDict()  # no parameters: the simple world's file is unchanged
        if textured(world):
            self.heads["phase"] = nn.Linear(num_features, PHASE_WIDTH)
            self.heads["blur"] = nn.Linear(num_features, 1)
            self.crop_heads["texture"] = nn.Linear(num_features, len(WORLDS[world].backgrounds))
            self.crop_heads["phase"] = nn.Linear(num_features, PHASE_WIDTH)
            self.crop_heads["blur"] = nn.Linear(num_features, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, num_features), the spatial mean of the last block."""
        return self.body(images * 2 - 1).mean(dim=(2, 3))

    def classify(self, images: torch.Tensor, view: str = "whole") -> dict[str, torch.Tensor]:
        """Head outputs by name: `view="whole"` for 32 px images, "crop" for 16 px crops."""
        heads = {"whole": self.heads, "crop": self.crop_heads}[view]
        features = self(images)
        return {name: head(features) for name, head in heads.items()}


class _LabelledWorld(Dataset):
    """Toy images in [0, 1] with their attribute indices; in a textured world also the phase
    targets, one random CROP_SIZE crop per item and, if `blur`, a random Gaussian blur of
    BLUR_FRACTION of the items (crop offset and blur drawn from (world seed, item))."""

    def __init__(self, world: ToyWorld, blur: bool = True):
        self.world, self.words = world, _attribute_words(world.world)
        self.textured, self.blur = textured(world.world), blur

    def __len__(self) -> int:
        return len(self.world)

    def __getitem__(self, i: int) -> dict:
        scene = self.world.scene(i)
        (shape,) = scene.shapes
        values = {"kind": shape.kind, "colour": shape.colour, "position": shape.position,
                  "background": scene.background}
        labels = {name: self.words[name].index(values[name]) for name in ATTRIBUTES}
        item = {"images": self.world[i]["pixel_values"] / 2 + 0.5, **labels}
        if self.textured:
            item.update(self._crop(i, item["images"], scene.background, scene.phase))
        return item

    def _crop(self, i: int, image: torch.Tensor, texture: str, phase: tuple[float, float]) -> dict:
        resolution = image.shape[-1]
        rng = np.random.default_rng([self.world.seed, i, 1])
        top, left = rng.integers(0, resolution - CROP_SIZE + 1, 2)
        sigma = float(rng.uniform(*BLUR_SIGMA)) if rng.random() < BLUR_FRACTION and self.blur else 0.0
        if sigma > 0:  # reflect-padded, before cropping: the crop is a view of the blurred image
            image = gaussian_blur(image, [2 * math.ceil(3 * sigma) + 1] * 2, [sigma, sigma])
        # The crop's own phase: the texture shifted by the crop offset (TEXTURE_PERIOD x side pixels a period).
        period = TEXTURE_PERIOD * resolution
        crop_phase = ((phase[0] + left / period) % 1.0, (phase[1] + top / period) % 1.0)
        phase_whole, mask_whole = phase_target(texture, phase)
        phase_crop, mask_crop = phase_target(texture, crop_phase)
        return {
            "images": image, "blur": torch.tensor([sigma], dtype=torch.float32),
            "phase": phase_whole, "phase_mask": mask_whole,
            "crops": image[:, top : top + CROP_SIZE, left : left + CROP_SIZE],  # (3, CROP_SIZE, CROP_SIZE)
            "texture": self.words["background"].index(texture),
            "crop_phase": phase_crop, "crop_phase_mask": mask_crop,
        }


def _masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return ((prediction - target) ** 2 * mask).sum() / mask.sum().clamp_min(1)


def _phase_error(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute angle between predicted and true (cos, sin) pairs, in periods (0 .. 0.5)."""
    predicted = torch.atan2(prediction[:, 1::2], prediction[:, 0::2])  # (B, 2)
    true = torch.atan2(target[:, 1::2], target[:, 0::2])
    error = torch.remainder(predicted - true + math.pi, 2 * math.pi) - math.pi
    weight = mask[:, 0::2]
    return (error.abs() * weight).sum() / weight.sum().clamp_min(1) / (2 * math.pi)


class FeatureNetModule(L.LightningModule):
    def __init__(self, network: ToyFeatureNet, lr: float = 2e-3, total_steps: int = 1000):
        super().__init__()
        self.network, self.lr, self.total_steps = network, lr, total_steps

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.network.classify(batch["images"])
        losses = {name: F.cross_entropy(logits[name], batch[name]) for name in ATTRIBUTES}
        accuracy = {f"accuracy/{n}": (logits[n].argmax(1) == batch[n]).float().mean() for n in ATTRIBUTES}
        if "crops" in batch:  # textured world: phase and blur on both views, texture on crops
            losses["phase"] = _masked_mse(logits["phase"], batch["phase"], batch["phase_mask"])
            losses["blur"] = BLUR_WEIGHT * F.mse_loss(logits["blur"], batch["blur"])
            crop = self.network.classify(batch["crops"], view="crop")
            losses["crop_texture"] = F.cross_entropy(crop["texture"], batch["texture"])
            losses["crop_phase"] = _masked_mse(crop["phase"], batch["crop_phase"], batch["crop_phase_mask"])
            losses["crop_blur"] = BLUR_WEIGHT * F.mse_loss(crop["blur"], batch["blur"])
            accuracy["accuracy/crop_texture"] = (crop["texture"].argmax(1) == batch["texture"]).float().mean()
        self.log_dict(accuracy)
        return sum(losses.values())

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.lr)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, self.lr, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _held_out_batch(world: ToyWorld, num_images: int, blur: bool = False) -> dict:
    data = _LabelledWorld(world, blur=blur)
    return next(iter(DataLoader(torch.utils.data.Subset(data, range(num_images)), batch_size=num_images)))


@torch.no_grad()
def attribute_accuracy(network: ToyFeatureNet, world: ToyWorld, num_images: int = 512) -> dict[str, float]:
    """Held-out accuracy per attribute (whole sharp images) on items 0..num_images-1 of `world`."""
    batch = _held_out_batch(world, num_images)
    logits = network.eval().classify(batch["images"])
    return {name: float((logits[name].argmax(1) == batch[name]).float().mean()) for name in ATTRIBUTES}


@torch.no_grad()
def held_out_report(network: ToyFeatureNet, world: ToyWorld, num_images: int = 512) -> dict[str, float]:
    """Every head on items 0..num_images-1 of `world`, sharp: "whole/<attribute>" accuracies and,
    in a textured world, "whole/phase_error", and on one random 16 px crop per image
    "crop/texture" and "crop/phase_error", and "centre_crop/texture" on the FID-Patch centre crop.
    Phase errors are mean absolute angle errors in periods (chance: 0.25). The blur heads:
    "whole/blur_error" and "crop/blur_error", mean absolute sigma errors in pixels with half the
    items blurred as in training (sigma uniform in BLUR_SIGMA)."""
    network = network.eval()
    batch = _held_out_batch(world, num_images)
    logits = network.classify(batch["images"])
    report = {f"whole/{n}": float((logits[n].argmax(1) == batch[n]).float().mean()) for n in ATTRIBUTES}
    if not textured(world.world):
        return report
    report["whole/phase_error"] = float(_phase_error(logits["phase"], batch["phase"], batch["phase_mask"]))
    crop = network.classify(batch["crops"], view="crop")
    report["crop/texture"] = float((crop["texture"].argmax(1) == batch["texture"]).float().mean())
    report["crop/phase_error"] = float(_phase_error(crop["phase"], batch["crop_phase"], batch["crop_phase_mask"]))
    start = (batch["images"].shape[-1] - CROP_SIZE) // 2
    centre = batch["images"][..., start : start + CROP_SIZE, start : start + CROP_SIZE]
    report["centre_crop/texture"] = float(
        (network.classify(centre, view="crop")["texture"].argmax(1) == batch["texture"]).float().mean()
    )
    blurred = _held_out_batch(world, num_images, blur=True)
    for view, images in (("whole", blurred["images"]), ("crop", blurred["crops"])):
        sigma = network.classify(images, view=view)["blur"]
        report[f"{view}/blur_error"] = float((sigma - blurred["blur"]).abs().mean())
    return report


def train_feature_net(steps: int = 800, batch_size: int = 64, seed: int = 0, world: str = "simple") -> ToyFeatureNet:
    """Train `ToyFeatureNet` on the toy world at 32 px (seeded; items from world seed `seed`)."""
    L.seed_everything(seed)
    network = ToyFeatureNet(world=world)
    data = _LabelledWorld(ToyWorld(RESOLUTION, size=steps * batch_size, seed=seed, world=world))
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
    one_shape = sorted(name for name, vocabulary in WORLDS.items() if vocabulary.max_shapes == 1)
    parser.add_argument("--world", default="simple", choices=one_shape)
    parser.add_argument("--out", type=Path, default=None, help="default: <assets_dir(world)>/" + FEATURES_NAME)
    parser.add_argument("--steps", type=int, default=800)
    args = parser.parse_args(argv)
    out = args.out or assets_dir(args.world) / FEATURES_NAME
    start = time.perf_counter()
    network = train_feature_net(args.steps, world=args.world)
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s")
    held_out = held_out_report(network, ToyWorld(RESOLUTION, seed=1, world=args.world))
    print("held-out (world seed 1, 512 images):", {k: round(v, 3) for k, v in held_out.items()})
    print("written:", save_feature_net(network, out))


if __name__ == "__main__":
    main()
