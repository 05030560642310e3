"""A folder of images with sidecar captions, prepared as SDXL's training script prepares them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from lightning_sdxl.data.bad_samples import BadSample, SkipsBadSamples
from lightning_sdxl.data.filters import SampleFilters

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp")
MAX_LISTED = 5
# A side longer than MAX_ASPECT x the short one is centre-cropped before resizing: a 4000 x 4 image
# would otherwise be resized to 1024 x 1,024,000 (3.9 GiB) only to keep its centre.
MAX_ASPECT = 4


def read_caption(path: Path) -> str:
    """A caption file's text, stripped; BadSample naming the file when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise BadSample(f"{path}: the caption is not UTF-8 ({error.reason} at byte {error.start}); re-save it as UTF-8") from None
    except OSError as error:
        raise BadSample(f"{path}: the caption cannot be read ({error})") from None


def resize_and_center_crop(image: Image.Image, resolution: int) -> tuple[Image.Image, int, int]:
    """Resize the shorter side to `resolution` (bicubic, antialiased), then centre-crop a square.

    Sizes and offsets follow torchvision's `Resize(int)` and `CenterCrop`, as diffusers'
    train_text_to_image_sdxl.py uses them.

    Returns:
        The `resolution` x `resolution` crop and its (top, left) in the resized image.
    """
    w, h = image.size
    if max(w, h) > MAX_ASPECT * min(w, h):  # keep the centre that the crop below would keep
        keep_w, keep_h = min(w, MAX_ASPECT * h), min(h, MAX_ASPECT * w)
        left, top = (w - keep_w) // 2, (h - keep_h) // 2
        image = image.crop((left, top, left + keep_w, top + keep_h))
        w, h = image.size
    if h <= w:
        new_h, new_w = resolution, int(resolution * w / h)
    else:
        new_h, new_w = int(resolution * h / w), resolution
    # PIL's resampling filters widen with the scale factor when downsizing: antialiased.
    resized = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    top = round((new_h - resolution) / 2.0)
    left = round((new_w - resolution) / 2.0)
    return resized.crop((left, top, left + resolution, top + resolution)), top, left


class CaptionedItems(SkipsBadSamples, Dataset):
    """A dataset of (image path, caption) pairs in `self.items` (a captions file, a manifest), read
    as training items at `self.resolution`; a listed file that is gone is a skipped BadSample."""

    items: list[tuple[Path, str]]
    resolution: int
    filters: SampleFilters | None = None  # the datamodule sets data.filters; None: keep everything

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, i: int) -> str:
        return self.items[i][1]

    def load_item(self, i: int) -> dict:
        path, caption = self.items[i]
        if not path.is_file():
            raise BadSample(f"{path}: listed but not found")
        if self.filters is not None:
            caption = self.filters.caption(caption, path)
        return captioned_image(path, caption, self.resolution, self.filters)


class FolderDataset(SkipsBadSamples, Dataset):
    """Images under `root` (recursive, sorted), each captioned by `<stem>.txt` beside it.

    Args:
        root: folder of images (.png, .jpg, .jpeg, .webp, any case) with sidecar captions.
        resolution: side R of the square training crops.

    Raises:
        FileNotFoundError: `root` is missing, holds no images, or some images lack a caption.
        NotADirectoryError: `root` is a file.
    """

    filters: SampleFilters | None = None  # the datamodule sets data.filters; None: keep everything

    def __init__(self, root: str | Path, resolution: int) -> None:
        self.root = Path(root)
        self.resolution = resolution
        if self.root.exists() and not self.root.is_dir():
            raise NotADirectoryError(
                f"data.root={root} is a file: point data.root at a folder of images with "
                "sidecar .txt captions"
            )
        if not self.root.exists():
            raise FileNotFoundError(
                f"data.root={root} does not exist: point data.root at a folder of images with "
                "sidecar .txt captions"
            )
        self.images = sorted(
            p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if not self.images:
            raise FileNotFoundError(
                f"data.root={root} holds no images ({', '.join(IMAGE_EXTENSIONS)}, searched "
                "recursively): point data.root at a folder of images with sidecar .txt captions"
            )
        # Existence only: captions are read when their items are.
        uncaptioned = [p for p in self.images if not self._caption_path(p).is_file()]
        if uncaptioned:
            listed = ", ".join(str(p.relative_to(self.root)) for p in uncaptioned[:MAX_LISTED])
            more = (
                f" and {len(uncaptioned) - MAX_LISTED} more"
                if len(uncaptioned) > MAX_LISTED
                else ""
            )
            raise FileNotFoundError(
                f"{len(uncaptioned)} of {len(self.images)} images under data.root={root} have no "
                f"caption file: {listed}{more}. Write each image's caption to <stem>.txt in the "
                "same folder (e.g. cat.png -> cat.txt), or remove the image"
            )

    @staticmethod
    def _caption_path(image_path: Path) -> Path:
        return image_path.with_suffix(".txt")

    def __len__(self) -> int:
        return len(self.images)

    def caption(self, i: int) -> str:
        """The caption of item i, whitespace stripped (BadSample when it is not UTF-8)."""
        return read_caption(self._caption_path(self.images[i]))

    def load_item(self, i: int) -> dict:
        caption = self.caption(i)
        if self.filters is not None:
            caption = self.filters.caption(caption, self._caption_path(self.images[i]))
        return captioned_image(self.images[i], caption, self.resolution, self.filters)


def captioned_image(path, caption: str, resolution: int, filters: SampleFilters | None = None, name: str | None = None) -> dict:
    """A training item (the data contract): the R x R centre crop in [-1, 1], its caption, and the
    original size and crop offset for SDXL's micro-conditioning. BadSample when it cannot be read.

    `path` is a file path or an open binary file (a shard's member, named by `name` in messages)."""
    where = name or path
    try:
        with Image.open(path) as file:
            image = ImageOps.exif_transpose(file).convert("RGB")  # upright; CMYK, alpha, grey -> RGB
    except (OSError, ValueError, Image.DecompressionBombError) as error:  # truncated, corrupt, not an image
        raise BadSample(f"{where}: {type(error).__name__}: {error}") from None
    if filters is not None:
        filters.image(image, where)  # Filtered (skipped and counted) when a filter drops it
    w, h = image.size
    crop, top, left = resize_and_center_crop(image, resolution)
    pixels = np.asarray(crop).transpose(2, 0, 1).astype(np.float32, order="C")  # (3, R, R)
    return {
        "pixel_values": torch.from_numpy(pixels / np.float32(127.5) - np.float32(1)),  # [-1, 1]
        "prompt": caption,
        "original_size": torch.tensor([h, w], dtype=torch.int64),  # (2,) source (h, w)
        "crop_top_left": torch.tensor([top, left], dtype=torch.int64),  # (2,) in resized image
    }
