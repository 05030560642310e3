"""python -m lightning_sdxl.toy.write_shards: toy-world images as img2dataset writes a dataset, so
`data=webdataset` runs end to end on the CPU with nothing downloaded.

    python -m lightning_sdxl.toy.write_shards outputs/toy_shards          # 4 shards x 256 samples, 32 px
    python train.py data=webdataset "data.shards='outputs/toy_shards/{00000..00003}.tar'" data.resolution=32

Layout (img2dataset's, `output_format=webdataset`): `<shard>.tar` holding `<key>.png`, `<key>.txt` (the
caption) and `<key>.json` (key, caption, width, height), and `<shard>_stats.json` with "successes".
PNG, not img2dataset's default JPEG: the toy teacher's images stay exact. The double quotes keep the
single ones for Hydra, whose override grammar would read the braces as a dictionary.
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
from pathlib import Path

from lightning_sdxl.data.toy_world import ToyWorld, render_scene
from lightning_sdxl.io import atomic_dir


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Write `data` into `tar` as the member `name`."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_toy_shards(out_dir: str | Path, shards: int = 4, per_shard: int = 256, resolution: int = 32,
                     world: str = "simple", seed: int = 0) -> Path:
    """Items 0 .. shards * per_shard - 1 of the toy world, in order, into `out_dir` (written atomically)."""
    dataset = ToyWorld(resolution=resolution, seed=seed, world=world)
    with atomic_dir(out_dir) as folder:
        for shard in range(shards):
            with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
                for row in range(per_shard):
                    index = shard * per_shard + row
                    scene = dataset.scene(index)
                    buffer = io.BytesIO()
                    render_scene(scene, resolution).save(buffer, "PNG")  # the uint8 pixels ToyWorld scales
                    key = f"{shard:05d}{row:04d}"
                    meta = {"key": key, "caption": scene.caption, "width": resolution, "height": resolution}
                    add_member(tar, f"{key}.png", buffer.getvalue())
                    add_member(tar, f"{key}.txt", scene.caption.encode())
                    add_member(tar, f"{key}.json", json.dumps(meta).encode())
            (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"successes": per_shard, "count": per_shard}))
    return Path(out_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_sdxl.toy.write_shards", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="the shard folder (replaced atomically)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--world", default="simple", help="simple (the toy teacher's), open or rich")
    args = parser.parse_args(argv)
    out = write_toy_shards(args.out_dir, args.shards, args.per_shard, args.resolution, args.world)
    last = f"{args.shards - 1:05d}"
    print(f"{args.shards * args.per_shard} samples in {out}; train with data=webdataset "
          f"\"data.shards='{out}/{{00000..{last}}}.tar'\" data.resolution={args.resolution}")


if __name__ == "__main__":
    main()
