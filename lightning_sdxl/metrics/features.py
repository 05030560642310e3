"""Feature networks for the evaluation metrics, loaded from local files only (METHOD.md 6).

Every FID extractor is a `FeatureExtractor`: an `nn.Module` with `num_features`, `input_size`
and `identity`, whose forward maps float images in [0, 1], (B, 3, input_size, input_size), to
(B, num_features). Nothing here downloads: a missing weights file raises `MissingMetricWeights`
naming the file expected and how to get it, and each class has a `check_available` that says so
without building the network, so a run can fail before its first step.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pickle
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from lightning_sdxl.errors import MissingPathError

# torch-fidelity's converted TF Inception (FID's reference network); pytorch-fid ships the same
# file (same SHA-256 prefix) as `pt_inception-2015-12-05-6726825d.pth`.
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
    "weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILENAMES = (
    "weights-inception-2015-12-05-6726825d.pth",
    "pt_inception-2015-12-05-6726825d.pth",
)
INCEPTION_SHA256_PREFIX = "6726825d"
INCEPTION_CONFIG_KEY = "metrics.fid_whole.extractor.weights_path"
OPENCLIP_CONFIG_KEY = "metrics.clip_score.scorer.pretrained"

_SHA256_CACHE: dict[tuple[str, int, int], str] = {}


class MissingMetricWeights(MissingPathError):
    """A metric network's weights file is not on disk; the message names it and how to get it."""


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file, memoised per (path, size, mtime) within the process."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _SHA256_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _SHA256_CACHE[memo] = digest.hexdigest()
    return _SHA256_CACHE[memo]


def _check_image_batch(images: Tensor, size: int | None = None) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"expected float images (B, 3, H, W) in [0, 1], got {tuple(images.shape)} {images.dtype}"
        )
    if size is not None and images.shape[-2:] != (size, size):
        raise ValueError(f"expected images at {size} x {size}, got {tuple(images.shape[-2:])}")


class FeatureExtractor(nn.Module):
    """Base of the FID feature networks: frozen, always in eval mode.

    Attributes:
        num_features: width d of the (B, d) features.
        input_size: side of the square images the forward takes.
        identity: name + weights fingerprint; part of the reference-statistics cache key.
    """

    num_features: int
    input_size: int
    identity: str

    def train(self, mode: bool = True) -> FeatureExtractor:
        return super().train(False)


def load_inception_state(path: str | os.PathLike) -> dict[str, Tensor]:
    """The Inception state dict from a .safetensors file or a .pth read with weights_only=True
    (plain tensors only); a .pth that needs pickle's arbitrary objects is refused."""
    if str(path).endswith(".safetensors"):
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as error:  # weights_only refusals
        raise ValueError(
            f"{path} holds more than plain tensors and is not loaded (it would run arbitrary code); "
            f"use torch-fidelity's original file or a safetensors copy ({type(error).__name__})."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} is not a state dict of tensors.")
    return state


class InceptionFeatures(FeatureExtractor):
    """FID's Inception-V3 pool features (2048-d), as torchmetrics computes them (torch-fidelity).

    Images are rounded to uint8 (as `torchvision.utils.save_image` does, so in-memory images score
    as their saved PNGs) and passed to torchmetrics' `NoTrainInceptionV3`.

    Args:
        weights_path: the torch-fidelity Inception file; None looks for it (either name in
            `INCEPTION_FILENAMES`) in torch hub's checkpoint folder ($TORCH_HOME/hub/checkpoints).
    """

    input_size = 299
    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None):
        path = self.check_available(weights_path)
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        sha256 = file_sha256(path)
        if not sha256.startswith(INCEPTION_SHA256_PREFIX):
            warnings.warn(
                f"{path} is not the standard FID Inception file (SHA-256 {sha256[:8]}, expected "
                f"{INCEPTION_SHA256_PREFIX}...): scores are not comparable with published FIDs"
            )
        # torch-fidelity reads its weights file with pickle (torch.load(weights_only=False)). It gets
        # a file written here from tensors read safely (load_inception_state), never the user's file.
        state = load_inception_state(path)
        with tempfile.TemporaryDirectory() as folder:
            safe_copy = Path(folder) / "inception_state.pt"
            torch.save(state, safe_copy)
            self.network = NoTrainInceptionV3(
                name="inception-v3-compat",
                features_list=["2048"],
                feature_extractor_weights_path=str(safe_copy),
            )
        self.identity = f"inception-v3-fid:{sha256[:16]}"
        self.eval()

    @staticmethod
    def check_available(weights_path: str | os.PathLike | None = None) -> Path:
        """The weights file that will be loaded; raises without building anything if it cannot be.

        Raises:
            MissingMetricWeights: no weights file.
            ModuleNotFoundError: torch-fidelity (torchmetrics' Inception) is not installed.
        """
        if weights_path is not None:
            candidates = [Path(weights_path).expanduser()]
        else:
            folder = Path(torch.hub.get_dir()) / "checkpoints"
            candidates = [folder / name for name in INCEPTION_FILENAMES]
        found = next((path for path in candidates if path.is_file()), None)
        if found is None:
            raise MissingMetricWeights(
                f"FID Inception weights not found at {candidates[0]}: download {INCEPTION_URL} and "
                f"place it at {candidates[0]} or set {INCEPTION_CONFIG_KEY}=<path>"
            )
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ModuleNotFoundError(
                "FID Inception needs torch-fidelity (torchmetrics' Inception-V3): "
                "pip install torch-fidelity (or torchmetrics[image])"
            )
        return found

    def forward(self, images: Tensor) -> Tensor:
        _check_image_batch(images, self.input_size)
        pixels = images.clamp(0, 1).mul(255).round().to(torch.uint8)  # (B, 3, 299, 299)
        return self.network(pixels)  # (B, 2048)


class LocalFeatures(FeatureExtractor):
    """Any small feature network whose weights are a local safetensors file (strictly loaded).

    A toy world's classifier plugs in as a module class (taking [0, 1] images at `input_size`,
    normalising inside) plus its weights file and a config; nothing else changes.

    Args:
        network: the module, built (randomly initialised) by the caller or by Hydra; every
            parameter and buffer is then overwritten from `weights_path`.
        weights_path: safetensors state dict of `network`.
        input_size: side of the square images the network takes.
        num_features: feature width; None reads `network.num_features` or runs one dummy batch.
        name: name in the cache key; defaults to the network's class path.
    """

    def __init__(
        self,
        network: nn.Module,
        weights_path: str | os.PathLike,
        input_size: int,
        num_features: int | None = None,
        name: str | None = None,
    ):
        path = self.check_available(weights_path)
        super().__init__()
        network.load_state_dict(load_file(str(path)), strict=True)
        self.network = network.requires_grad_(False).eval()
        self.input_size = int(input_size)
        if num_features is None:
            num_features = getattr(network, "num_features", None)
        if num_features is None:
            with torch.no_grad():
                num_features = network(torch.zeros(1, 3, input_size, input_size)).shape[-1]
        self.num_features = int(num_features)
        name = name or f"{type(network).__module__}.{type(network).__qualname__}"
        self.identity = f"{name}:{file_sha256(path)[:16]}"
        self.eval()

    @staticmethod
    def check_available(weights_path: str | os.PathLike) -> Path:
        """The safetensors file that will be loaded; raises MissingMetricWeights if absent."""
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise MissingMetricWeights(
                f"feature network weights not found at {path}: write or copy them there"
            )
        return path

    def forward(self, images: Tensor) -> Tensor:
        _check_image_batch(images, self.input_size)
        dtype = next(self.network.parameters(), images).dtype
        return self.network(images.to(dtype)).flatten(1)  # (B, num_features)


class OpenCLIPScorer(nn.Module):
    """An OpenCLIP model that scores image-prompt pairs as 100 x cos(image, text) (METHOD.md 6).

    Images are preprocessed as open_clip's eval transform does (resize the shorter side to the
    model's size, bicubic with antialias; centre crop; normalise), on tensors.

    Args:
        model_name: open_clip architecture, e.g. "ViT-g-14", or the name (file stem) of a custom
            config given in `model_config`.
        pretrained: a local weights file (.safetensors, .bin, .pt) or an open_clip pretrained tag
            (e.g. "laion2b_s34b_b88k") found in the Hugging Face or open_clip cache, never fetched.
        model_config: a custom open_clip config (a JSON file, or a folder of them) to register
            first, for toy CLIPs.
        cache_dir: open_clip's `cache_dir` (None: the Hugging Face cache and ~/.cache/clip).
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str,
        model_config: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        import open_clip

        path, tag_cfg = self._resolve(model_name, pretrained, model_config, cache_dir)
        super().__init__()
        overrides = {
            key: tag_cfg[key]
            for key in ("mean", "std", "interpolation", "resize_mode")
            if key in tag_cfg
        }
        model = open_clip.create_model(
            model_name,
            pretrained=str(path),
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            force_preprocess_cfg=overrides,
        )
        self.model = model.requires_grad_(False).eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        self.image_size = int(size if isinstance(size, int) else size[0])
        if (
            cfg.get("resize_mode", "shortest") != "shortest"
            or cfg.get("interpolation", "bicubic") != "bicubic"
        ):
            raise ValueError(
                f"{model_name}: only open_clip's default 'shortest' bicubic preprocessing is supported"
            )
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.identity = f"open_clip:{model_name}:{Path(path).name}"
        self.eval()

    def train(self, mode: bool = True) -> OpenCLIPScorer:
        return super().train(False)

    @classmethod
    def check_available(
        cls,
        model_name: str,
        pretrained: str,
        model_config: str | os.PathLike | None = None,
        cache_dir: str | os.PathLike | None = None,
    ) -> Path:
        """The weights file that will be loaded; raises MissingMetricWeights without building the model."""
        return cls._resolve(model_name, pretrained, model_config, cache_dir)[0]

    @staticmethod
    def _resolve(model_name, pretrained, model_config, cache_dir) -> tuple[Path, dict]:
        import open_clip
        from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

        if model_config is not None:
            if not Path(model_config).exists():
                raise FileNotFoundError(f"open_clip model config not found at {model_config}")
            open_clip.add_model_config(model_config)
        if open_clip.get_model_config(model_name) is None:
            raise ValueError(
                f"unknown open_clip model {model_name!r}: give its JSON config as model_config"
            )
        local = Path(pretrained).expanduser()
        tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not tag_cfg:
            if local.is_file():
                return local, {}
            raise MissingMetricWeights(
                f"OpenCLIP weights for {model_name} not found at {local}: place them there or set "
                f"{OPENCLIP_CONFIG_KEY}=<path or open_clip tag>"
            )
        if "file" in tag_cfg and Path(tag_cfg["file"]).is_file():
            return Path(tag_cfg["file"]), tag_cfg
        if tag_cfg.get("hf_hub"):
            from huggingface_hub import try_to_load_from_cache

            # As open_clip's download_pretrained: "org/repo/" means its default file; safetensors first.
            repo_id, filename = os.path.split(tag_cfg["hf_hub"])
            filename = filename or HF_WEIGHTS_NAME
            names = [filename]
            if filename == HF_WEIGHTS_NAME:
                names.insert(0, HF_SAFE_WEIGHTS_NAME)
            elif filename.endswith((".bin", ".pth")):
                names.insert(0, filename[:-4] + ".safetensors")
            for name in names:
                cached = try_to_load_from_cache(repo_id, name, cache_dir=cache_dir)
                if isinstance(cached, str) and os.path.isfile(cached):
                    return Path(cached), tag_cfg
            raise MissingMetricWeights(
                f"OpenCLIP {model_name} '{pretrained}' weights not in the Hugging Face cache: run "
                f"`huggingface-cli download {repo_id} {names[0]}` (https://huggingface.co/{repo_id}) "
                f"or place the file anywhere and set {OPENCLIP_CONFIG_KEY}=<path>"
            )
        url = tag_cfg["url"]
        target = Path(cache_dir or Path.home() / ".cache" / "clip") / os.path.basename(url)
        if target.is_file():
            return target, tag_cfg
        raise MissingMetricWeights(
            f"OpenCLIP {model_name} '{pretrained}' weights not found at {target}: download {url} and "
            f"place it at {target} or set {OPENCLIP_CONFIG_KEY}=<path>"
        )

    def preprocess(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> normalised (B, 3, S, S) at the model's image size S."""
        _check_image_batch(images)
        height, width = images.shape[-2:]
        scale = self.image_size / min(height, width)
        size = (
            max(self.image_size, round(height * scale)),
            max(self.image_size, round(width * scale)),
        )
        if size != (height, width):
            images = F.interpolate(
                images, size=size, mode="bicubic", antialias=True, align_corners=False
            )
            images = images.clamp(0, 1)  # bicubic overshoots; PIL would clip to uint8
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        crop = self.image_size
        images = images[..., top : top + crop, left : left + crop]  # (B, 3, S, S)
        return (images - self.mean) / self.std

    def encode_images(self, images: Tensor) -> Tensor:
        """Unit-norm image embeddings (B, D) of images in [0, 1]."""
        pixels = self.preprocess(images).to(self.mean.dtype)
        return F.normalize(self.model.encode_image(pixels).float(), dim=-1)

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Unit-norm text embeddings (B, D)."""
        tokens = self.tokenizer(list(prompts)).to(self.mean.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def forward(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Per-pair scores 100 x cos(image, prompt), (B,), not clamped."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts")
        return 100 * (self.encode_images(images) * self.encode_prompts(prompts)).sum(dim=-1)
