"""Data throughput per source beside the training step's consumption, on the toy default.

    python -m lightning_sdxl.benchmarks.data [--batches 40]

Samples per second of one loader process (num_workers=0, so the figure is per worker) for the toy
world, a folder of PNG files with captions (the toy world's images written out), and the latent
cache of the same items (`data=cached`), beside the samples per second that the default training
step (8to4 cond_adv, LoRA, batch 8, toy teacher) consumes from images and from the cache. The
ratio step / loader is the number of workers a source needs to keep the step fed. Measured side by
side in one process, each loader timed after one warm-up batch.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import hydra
import torchvision

from lightning_sdxl.benchmarks.step import trainer_free
from lightning_sdxl.run_config import compose_train_config

BATCH = 8


def loader_rate(datamodule, batches: int) -> float:
    iterator = iter(datamodule.train_dataloader())
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * BATCH / (time.perf_counter() - start)


def step_rate(module, datamodule, batches: int) -> float:
    iterator = iter(datamodule.train_dataloader())
    data = [next(iterator) for _ in range(batches + 1)]
    with trainer_free(module):
        module.training_step(data[0], 0)
        start = time.perf_counter()
        for batch in data[1:]:
            module.training_step(batch, 0)
            module.zero_grad(set_to_none=True)
    return batches * BATCH / (time.perf_counter() - start)


def write_folder(datamodule, folder: Path, items: int) -> None:
    for i in range(items):
        item = datamodule.world[i]
        torchvision.utils.save_image(item["pixel_values"] / 2 + 0.5, folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(item["prompt"])


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=40)
    args = parser.parse_args(argv)
    from lightning_sdxl.precompute import write_cache

    items = (args.batches + 2) * BATCH
    base = ["logger=none", f"data.batch_size={BATCH}", "data.num_workers=0"]
    toy_cfg = compose_train_config(base)
    toy = hydra.utils.instantiate(toy_cfg.data)
    with tempfile.TemporaryDirectory() as scratch:
        folder, cache = Path(scratch) / "images", Path(scratch) / "cache"
        folder.mkdir()
        write_folder(toy, folder, items)
        precompute = compose_train_config([*base, f"+cache_dir={cache}", f"+max_items={items}", "+encode_batch_size=32",
                                           "+shard_items=1024"])
        write_cache(precompute)
        sources = {
            "toy world": toy,
            "folder (PNG + .txt)": hydra.utils.instantiate(compose_train_config([*base, "data=folder", f"data.root={folder}",
                                                                                 "data.resolution=32"]).data),
            "latent cache": hydra.utils.instantiate(compose_train_config([*base, "data=cached", f"data.cache_dir={cache}"]).data),
        }
        rates = {name: loader_rate(datamodule, args.batches) for name, datamodule in sources.items()}
        module = hydra.utils.instantiate(toy_cfg.module)
        steps = {
            "step from images": step_rate(module, toy, args.batches // 4),
            "step from the cache": step_rate(module, sources["latent cache"], args.batches // 4),
        }
    print("samples per second, one process, toy default (32 px, batch 8)")
    print("| source | loader (per worker) | workers to feed the step from images |")
    print("| --- | ---: | ---: |")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.0f} | {steps['step from images'] / rate:.4f} |")
    for name, rate in steps.items():
        print(f"| {name} (consumption) | {rate:.1f} | |")
    return {**rates, **steps}


if __name__ == "__main__":
    main()
