"""A manifest of image paths and captions (CSV, or parquet with pyarrow), the second real-data
source beside a folder (issue 14): what users export from a database or an img2dataset run.

Rows are read once; image files are opened only when their items are (a missing or broken file is
skipped with its name logged, lightning_sdxl/data/folder.py's SkipsBadSamples), so a manifest of
millions of rows indexes in seconds.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning_sdxl.data.folder import CaptionedItems
from lightning_sdxl.errors import ConfigError, MissingPathError


def read_manifest(path: Path, image_column: str, caption_column: str) -> list[tuple[str, str]]:
    """(image, caption) per row; ConfigError naming the fix for a missing column or an unreadable file."""
    if path.suffix.lower() == ".parquet":
        try:
            from pyarrow import parquet
        except ImportError:
            raise ConfigError(f"data.manifest={path} is parquet: pip install pyarrow (or give a CSV).") from None
        table = parquet.read_table(path)
        columns = table.column_names
        rows = None if {image_column, caption_column} - set(columns) else zip(
            table.column(image_column).to_pylist(), table.column(caption_column).to_pylist()
        )
    else:
        try:
            with open(path, newline="", encoding="utf-8") as handle:
                reader = csv.DictReader(handle)
                columns = reader.fieldnames or []
                rows = None if {image_column, caption_column} - set(columns) else [
                    (row[image_column], row[caption_column]) for row in reader
                ]
        except (UnicodeDecodeError, csv.Error) as error:
            raise ConfigError(f"data.manifest={path} is not a readable UTF-8 CSV ({error}).") from None
    if rows is None:
        raise ConfigError(
            f"data.manifest={path} has columns {list(columns)}; name the image path and caption columns with "
            f"data.image_column= and data.caption_column= (now {image_column!r} and {caption_column!r})."
        )
    return [(str(image or ""), str(caption or "").strip()) for image, caption in rows]


class ManifestDataset(CaptionedItems):
    """One item per manifest row: the image at its path (absolute, or relative to `image_root`, by
    default the manifest's folder) with its caption; rows without an image path or caption are
    dropped at indexing and counted (`dropped`).

    Args:
        manifest: a .csv (header row) or .parquet file.
        resolution: side R of the square crops.
        image_column, caption_column: the columns holding the path and the caption.
        image_root: folder relative paths start from (None: the manifest's folder).
    """

    def __init__(self, manifest: str | Path, resolution: int, image_column: str = "image",
                 caption_column: str = "caption", image_root: str | Path | None = None):
        self.manifest, self.resolution = Path(manifest), resolution
        if not self.manifest.is_file():
            raise MissingPathError(f"data.manifest={manifest} does not exist: give a CSV or parquet of image paths and captions.")
        root = Path(image_root) if image_root is not None else self.manifest.parent
        rows = read_manifest(self.manifest, image_column, caption_column)
        self.items = [(root / image, caption) for image, caption in rows if image and caption]
        self.dropped = len(rows) - len(self.items)
        if not self.items:
            raise ConfigError(f"data.manifest={manifest} has no row with both an image path and a caption.")
