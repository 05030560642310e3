"""`data=webdataset`: img2dataset's output as it is, tar shards of `<key>.jpg|.png|.webp` + `<key>.txt`
(+ `<key>.json`), read by index through `wids` (webdataset's indexed reader).

Why wids and not webdataset's streaming `WebDataset` or litdata: it gives random access by sample
index over local tar files read in place, so the datasets' one sampler (`data/resumable.py`) shards
ranks without duplicates and a resumed run continues with the next unseen batch, exactly as for a
folder; a streaming pipeline splits by shard and restarts a shard on resume, and litdata needs its
own conversion of the data. Shards are read where they lie (wids' download cache is not used).

Each shard's sample count comes from img2dataset's `<shard>_stats.json` ("successes") when present,
else from reading the tar's headers once.
"""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

from braceexpand import braceexpand
from torch.utils.data import Dataset

from lightning_sdxl.data.bad_samples import BadSample, SkipsBadSamples
from lightning_sdxl.data.filters import SampleFilters
from lightning_sdxl.data.folder import IMAGE_EXTENSIONS, captioned_image
from lightning_sdxl.errors import MissingPathError

log = logging.getLogger(__name__)


def expand_shards(shards: str | list[str]) -> list[Path]:
    """Shard paths from brace patterns (`/data/laion/{00000..01023}.tar`) or a list of them."""
    patterns = [shards] if isinstance(shards, str) else list(shards)
    paths = [Path(path) for pattern in patterns for path in braceexpand(str(pattern))]
    missing = [str(path) for path in paths if not path.is_file()]
    if not paths or missing:
        raise MissingPathError(
            f"data.shards={shards}: {len(missing)} of {len(paths)} shards do not exist (e.g. {missing[:2]}); "
            """give local tar files, e.g. "data.shards='/data/laion/{00000..01023}.tar'" (quoted so in a shell)."""
        )
    return paths


def shard_length(path: Path) -> int:
    """Samples in a shard: img2dataset's stats file, else its image members counted; 0, with a
    warning naming it, for a shard that is not a readable tar (it is skipped)."""
    stats = path.with_name(f"{path.stem}_stats.json")
    if stats.is_file():
        return int(json.loads(stats.read_text())["successes"])
    try:
        with tarfile.open(path, "r:") as tar:
            return sum(1 for member in tar if Path(member.name).suffix.lower() in IMAGE_EXTENSIONS)
    except (tarfile.TarError, OSError) as error:
        log.warning("data.shards: skipping %s, not a readable tar file (%s)", path, error)
        return 0


class ShardDataset(SkipsBadSamples, Dataset):
    """Captioned images from tar shards, by index; an unreadable sample (corrupt image, no or non-UTF-8
    caption) is a skipped BadSample named by its shard and key.

    Args:
        shards: brace patterns or paths of tar files.
        resolution: side R of the square training crops.
    """

    filters: SampleFilters | None = None  # the datamodule sets data.filters

    def __init__(self, shards: str | list[str], resolution: int) -> None:
        import wids

        self.resolution = resolution
        lengths = {path: shard_length(path) for path in expand_shards(shards)}
        self.paths = [path for path, length in lengths.items() if length > 0]
        self.skipped_shards = len(lengths) - len(self.paths)  # unreadable or empty, each named in the log
        if not self.paths:
            raise MissingPathError(f"data.shards={shards}: none of the {len(lengths)} shards holds a readable sample.")
        specs = [{"url": str(path), "nsamples": lengths[path]} for path in self.paths]
        self.reader = wids.ShardListDataset(specs, transformations=[], localname=lambda url: url)

    def __len__(self) -> int:
        return len(self.reader)

    def _sample(self, i: int) -> dict:
        try:
            return self.reader[i]
        except (OSError, ValueError, KeyError, tarfile.TarError) as error:  # a truncated or corrupt shard
            raise BadSample(f"sample {i} of data.shards: {type(error).__name__}: {error}") from None

    def caption(self, i: int) -> str:
        sample = self._sample(i)
        where = f"{sample['__shard__']}:{sample['__key__']}"
        if ".txt" not in sample:
            raise BadSample(f"{where}: no .txt caption")
        try:
            return sample[".txt"].getvalue().decode("utf-8").strip()
        except UnicodeDecodeError as error:
            raise BadSample(f"{where}: the caption is not UTF-8 ({error})") from None

    def load_item(self, i: int) -> dict:
        sample = self._sample(i)
        where = f"{sample['__shard__']}:{sample['__key__']}"
        image = next((sample[ext] for ext in IMAGE_EXTENSIONS if ext in sample), None)
        if image is None:
            raise BadSample(f"{where}: no image ({', '.join(IMAGE_EXTENSIONS)})")
        caption = self.caption(i)
        if self.filters is not None:
            caption = self.filters.caption(caption, where)
            if ".json" in sample:
                try:
                    self.filters.metadata(json.loads(sample[".json"].getvalue()), where)
                except (UnicodeDecodeError, json.JSONDecodeError) as error:
                    raise BadSample(f"{where}: unreadable .json metadata ({error})") from None
        return captioned_image(io.BytesIO(image.getvalue()), caption, self.resolution, self.filters, name=where)
