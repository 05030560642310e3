"""COCO-style captions: a captions JSON with image paths, the paper's evaluation set (METHOD.md 6:
the first 10K COCO val captions, references the matching images)."""

from __future__ import annotations

import json
from pathlib import Path

from lightning_sdxl.data.folder import MAX_LISTED, CaptionedItems
from lightning_sdxl.errors import ConfigError


def _malformed(path: Path, what: str) -> ConfigError:
    return ConfigError(f"data.captions_file={path} {what}; a COCO captions JSON has \"images\": [{{id, file_name}}] "
                       "and \"annotations\": [{image_id, caption}].")


def read_coco_captions(path: Path, max_captions: int | None = None) -> list[tuple[str, str]]:
    """(file_name, caption) per annotation, in file order; ConfigError naming the entry for a file
    that is not valid JSON, lacks a key, names an unknown image, has no caption, or a file_name
    outside the image folder (absolute or with ..)."""
    try:
        coco = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise _malformed(path, f"is not valid UTF-8 JSON ({error})") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list) or not isinstance(coco.get("annotations"), list):
        raise _malformed(path, "lacks an \"images\" or \"annotations\" list")
    files = {}
    for index, image in enumerate(coco["images"]):
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise _malformed(path, f"has an image entry without id or file_name (images[{index}])")
        name = image["file_name"]
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise _malformed(path, f"names {name!r} (images[{index}]), outside data.image_root: give paths relative to it")
        files[image["id"]] = name
    pairs = []
    for index, annotation in enumerate(coco["annotations"][:max_captions]):
        if not isinstance(annotation, dict) or annotation.get("image_id") not in files:
            raise _malformed(path, f"has annotations[{index}] whose image_id is not among its images")
        caption = annotation.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise _malformed(path, f"has annotations[{index}] without a caption")
        pairs.append((files[annotation["image_id"]], caption.strip()))
    if not pairs:
        raise _malformed(path, "has no annotations")
    return pairs


class CocoCaptionsDataset(CaptionedItems):
    """One item per caption, in file order, with the image it describes.

    Args:
        captions_file: a COCO captions JSON (`images`: [{id, file_name}], `annotations`:
            [{image_id, caption}]), e.g. captions_val2014.json.
        image_root: folder the `file_name`s are relative to.
        resolution: side R of the square crops.
        max_captions: keep the first this many captions (None: all).

    Raises:
        FileNotFoundError: the captions file or image folder is missing, or images it names are.
    """

    def __init__(self, captions_file: str | Path, image_root: str | Path, resolution: int, max_captions: int | None = None):
        self.captions_file, self.image_root, self.resolution = Path(captions_file), Path(image_root), resolution
        if not self.captions_file.is_file():
            raise FileNotFoundError(
                f"data.captions_file={captions_file} does not exist: point it at a COCO captions JSON "
                "(e.g. annotations/captions_val2014.json)."
            )
        if not self.image_root.is_dir():
            raise FileNotFoundError(f"data.image_root={image_root} is not a folder: point it at the COCO images.")
        self.items = [
            (self.image_root / file_name, caption)
            for file_name, caption in read_coco_captions(self.captions_file, max_captions)
        ]
        missing = [str(path) for path, _ in self.items if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images named in {captions_file} are not under data.image_root={image_root} "
                f"(e.g. {', '.join(missing[:MAX_LISTED])})."
            )
