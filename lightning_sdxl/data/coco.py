"""COCO-style captions: a captions JSON with image paths, the paper's evaluation set (METHOD.md 6:
the first 10K COCO val captions, references the matching images)."""

from __future__ import annotations

import json
from pathlib import Path

from torch.utils.data import Dataset

from lightning_sdxl.data.folder import MAX_LISTED, captioned_image


class CocoCaptionsDataset(Dataset):
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
        coco = json.loads(self.captions_file.read_text())
        files = {image["id"]: image["file_name"] for image in coco["images"]}
        annotations = coco["annotations"][:max_captions]
        self.items = [(self.image_root / files[a["image_id"]], a["caption"].strip()) for a in annotations]
        missing = [str(path) for path, _ in self.items if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} images named in {captions_file} are not under data.image_root={image_root} "
                f"(e.g. {', '.join(missing[:MAX_LISTED])})."
            )

    def __len__(self) -> int:
        return len(self.items)

    def caption(self, i: int) -> str:
        return self.items[i][1]

    def __getitem__(self, i: int) -> dict:
        path, caption = self.items[i]
        return captioned_image(path, caption, self.resolution)
