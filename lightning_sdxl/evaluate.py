"""evaluate(cfg): FID-Whole, FID-Patch and CLIP score of a model at several step counts (METHOD.md 6),
with precision and recall (Kynkaanniemi et al. 2019) on the FID-Whole view and network.

The model under test is the teacher, a Lightning checkpoint's student, an exported UNet folder, or a
LoRA file on the base model. Images are written to disk as they are generated, so a rerun after a
crash regenerates only what is missing; the table goes to `results.md`, `results.csv` and
`results.json`, a grid of the first prompts across step counts to `grid.png`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from omegaconf import DictConfig, ListConfig, open_dict
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor
from torchvision.utils import make_grid, save_image
from tqdm import tqdm

from lightning_sdxl.diffusion.prediction import get_prediction
from lightning_sdxl.diffusion.sampler import generate
from lightning_sdxl.diffusion.schedule import NoiseSchedule
from lightning_sdxl.diffusion.solver import unet_fn
from lightning_sdxl.errors import ConfigError, MissingPathError, instantiate_checked
from lightning_sdxl.finite_guard import all_finite
from lightning_sdxl.io import atomic_path
from lightning_sdxl.metrics import ReferenceStatsCache, prepare_reference
from lightning_sdxl.metrics.fid import check_patch_fits
from lightning_sdxl.metrics.precision_recall import PrecisionRecall
from lightning_sdxl.metrics.reference_stats import reference_id
from lightning_sdxl.models.loading import check_pipeline_folder, frozen_encoders, load_sdxl
from lightning_sdxl.models.text_encoding import SDXLTextEncoder, build_condition, unconditional_like
from lightning_sdxl.models.vae import decode_latents, vae_scale_factor

log = logging.getLogger(__name__)
KINDS = ("latest", "teacher", "checkpoint", "unet", "lora")
RUNS_DIR = Path("outputs")  # where train.py writes runs (conf/train.yaml's hydra.run.dir)


def latest_export(runs_dir: Path | None = None) -> Path:
    """The newest training run's exported UNet under `runs_dir` (by its export_info.json's time):
    what `python eval.py` scores after `python train.py`. Default: RUNS_DIR."""
    runs_dir = RUNS_DIR if runs_dir is None else runs_dir
    exports = [info.parent / "unet" for info in runs_dir.glob("**/export/export_info.json") if (info.parent / "unet").is_dir()]
    if not exports:
        raise MissingPathError(
            f"target.kind=latest: no finished training run under {runs_dir}/ (none has export/unet): run "
            "`python train.py` first, or name the model: target.kind=unet|checkpoint|lora target.path=... or target.kind=teacher."
        )
    return max(exports, key=lambda unet: (unet.parent / "export_info.json").stat().st_mtime)


def resolve_latest(cfg: DictConfig) -> None:
    """target.kind=latest (the default) becomes target.kind=unet on the newest run's export, in place."""
    if cfg.target.kind != "latest":
        return
    unet = latest_export()
    base = json.loads((unet.parent / "export_info.json").read_text()).get("base_model")
    if base and cfg.model.path is not None and Path(str(cfg.model.path)).name != base:
        raise ConfigError(
            f"target.kind=latest: the newest run ({unet.parent.parent}) distilled {base}, but model.path is "
            f"{cfg.model.path}; pick its model group (e.g. model=toy_open for toy-sdxl-open) or name the target."
        )
    with open_dict(cfg):
        cfg.target.kind, cfg.target.path = "unet", str(unet)
        cfg.target.name = cfg.target.name or f"unet:{unet.parent.parent.name}"
    log.info("target.kind=latest: evaluating %s", unet)
GRID_PROMPTS = 8
COLUMNS = ["model", "steps", "fid_whole", "fid_patch", "clip_score", "precision", "recall"]


@dataclass
class ModelUnderTest:
    """A UNet with its prediction type and the base model's text encoders, VAE and schedule."""

    name: str
    unet: UNet2DConditionModel
    prediction_type: str
    text_encoder: SDXLTextEncoder
    vae: torch.nn.Module
    schedule: NoiseSchedule


def step_counts(steps) -> list[int]:
    """`steps=4` or `steps=[1,2,4,8]` (a multirun sweeps the scalar form)."""
    return [int(s) for s in steps] if isinstance(steps, (list, tuple, ListConfig)) else [int(steps)]


def validate_eval_config(cfg: DictConfig) -> None:
    """Fail in one line, before any model loads."""
    resolve_latest(cfg)
    kind, path = cfg.target.kind, cfg.target.path
    if kind not in KINDS:
        raise ConfigError(f"target.kind={kind}: choose one of {KINDS}.")
    if kind != "teacher" and (path is None or not Path(str(path)).exists()):
        raise MissingPathError(f"target.path={path} does not exist: give the {kind} to evaluate (see conf/eval.yaml).")
    if kind == "unet" and not (Path(str(path)) / "config.json").exists():
        raise MissingPathError(f"target.path={path} is not a diffusers UNet folder (no config.json): pass the export's unet/.")
    counts = step_counts(cfg.steps)
    if not counts or min(counts) < 1:
        raise ConfigError(f"steps={cfg.steps}: give positive step counts, e.g. steps=[1,2,4,8].")
    if cfg.num_images < 2:
        raise ConfigError(f"num_images={cfg.num_images}: FID needs at least 2 images.")
    neighborhood = cfg.get("precision_recall", {}).get("neighborhood", 3)
    if neighborhood < 1:
        raise ConfigError(f"precision_recall.neighborhood={neighborhood}: give k >= 1 (torch-fidelity's default: 3).")
    if cfg.model.path is not None:
        try:
            check_pipeline_folder(str(cfg.model.path))
        except FileNotFoundError as error:
            raise MissingPathError(str(error)) from error


def _prediction_of_unet_folder(unet_dir: Path, fallback: str) -> str:
    """An export's scheduler/ beside unet/ says the prediction type (x0 for 1-step models)."""
    scheduler_config = unet_dir.parent / "scheduler" / "scheduler_config.json"
    if scheduler_config.exists():
        return json.loads(scheduler_config.read_text()).get("prediction_type", fallback)
    return fallback


def load_model_under_test(cfg: DictConfig, device: torch.device) -> ModelUnderTest:
    """The UNet to evaluate, on the base model's text encoders, VAE and noise schedule."""
    base = load_sdxl(str(cfg.model.path))
    teacher_prediction = base.scheduler_config.get("prediction_type", "epsilon")
    kind, path = cfg.target.kind, cfg.target.path
    if kind == "teacher":
        unet, prediction = base.unet, teacher_prediction
    elif kind == "checkpoint":
        from lightning_sdxl.export import merged_unet
        from lightning_sdxl.module import DistillationModule

        module = DistillationModule.for_inference(path)
        unet, prediction = merged_unet(module), module.student_prediction.name
    elif kind == "unet":
        unet = UNet2DConditionModel.from_pretrained(str(path), use_safetensors=True)
        prediction = _prediction_of_unet_folder(Path(str(path)), teacher_prediction)
    else:  # a LoRA file (diffusers or kohya format) on the base model, fused
        pipe = StableDiffusionXLPipeline.from_pretrained(str(cfg.model.path), use_safetensors=True)
        pipe.load_lora_weights(str(path))
        pipe.fuse_lora()
        pipe.unload_lora_weights()
        unet, prediction = pipe.unet, cfg.target.prediction_type or teacher_prediction
    prediction = cfg.target.prediction_type or prediction
    vae, text_encoder = frozen_encoders(base, base.vae.dtype)  # as loaded: no cast
    if not all_finite(p.detach() for p in unet.parameters()):  # a NaN run's weights: nothing to score
        raise ConfigError(f"target {kind} {path or ''} has NaN or inf weights: it cannot be evaluated.")
    name = cfg.target.name or (kind if kind == "teacher" else f"{kind}:{Path(str(path)).name}")
    return ModelUnderTest(
        name=name,
        unet=unet.to(device).eval().requires_grad_(False),
        prediction_type=prediction,
        text_encoder=text_encoder.to(device),
        vae=vae.to(device),
        schedule=NoiseSchedule.from_scheduler_config(base.scheduler_config).to(device),
    )


IMAGES_KEY = "images_key.json"


@torch.no_grad()
def weights_fingerprint(unet: torch.nn.Module) -> str:
    """A digest of the UNet's weights (sums in float64 per tensor): two different models, or one
    trained further, never share a cached image folder (seconds for SDXL on a CPU)."""
    sums = [f"{name}:{p.double().sum().item():.10e}:{p.double().abs().sum().item():.10e}" for name, p in unet.named_parameters()]
    return hashlib.sha256("\n".join(sums).encode()).hexdigest()[:16]


def images_key(model: ModelUnderTest, fingerprint: str, prompts: list[str], seeds: list[int], num_steps: int,
               guidance_scale: float, resolution: int) -> dict:
    """Everything that determines the generated images: a cached folder with another key is stale."""
    inputs = hashlib.sha256(json.dumps([prompts, seeds]).encode()).hexdigest()[:16]
    return {"weights": fingerprint, "prediction_type": model.prediction_type, "steps": num_steps,
            "guidance_scale": float(guidance_scale), "resolution": resolution, "prompts_and_seeds": inputs}


@torch.no_grad()
def generate_images(
    model: ModelUnderTest, prompts: list[str], seeds: list[int], num_steps: int, guidance_scale: float,
    resolution: int, folder: Path, batch_size: int, fingerprint: str = "",
) -> list[Path]:
    """Generate (or reuse, after a crash) one PNG per prompt at `num_steps`; return the paths.

    Images are reused only when the folder's `images_key.json` matches (`images_key`: weights,
    prediction, steps, guidance, resolution, prompts and seeds); otherwise they are regenerated."""
    paths = [folder / f"{index:06d}.png" for index in range(len(prompts))]
    key = images_key(model, fingerprint, prompts, seeds, num_steps, guidance_scale, resolution)
    key_file = folder / IMAGES_KEY
    if not key_file.exists() or json.loads(key_file.read_text()) != key:
        for path in folder.glob("*.png"):  # another model's or setting's images (or an unkeyed folder)
            path.unlink()
        with atomic_path(key_file) as temporary:
            temporary.write_text(json.dumps(key, indent=2))
    missing = [index for index, path in enumerate(paths) if not path.exists()]
    device = next(model.unet.parameters()).device
    prediction = get_prediction(model.prediction_type)
    for start in tqdm(range(0, len(missing), batch_size), desc=f"{model.name} {num_steps} steps: generate"):
        batch = missing[start : start + batch_size]
        condition = build_condition(model.text_encoder, [prompts[i] for i in batch], (resolution, resolution)).to(device)
        uncondition = unconditional_like(model.text_encoder, condition) if guidance_scale > 1 else None
        latents = generate(
            unet_fn(model.unet), model.schedule, prediction, [seeds[i] for i in batch],
            resolution // vae_scale_factor(model.vae.config), num_steps, condition, uncondition, guidance_scale,
        )
        for index, image in zip(batch, decode_latents(model.vae, latents)):
            with atomic_path(paths[index]) as temporary:
                save_image(image, temporary, format="png")
    return paths


def load_images(paths: list[Path], batch_size: int):
    """Batches of saved images as float (B, 3, H, W) in [0, 1]."""
    for start in range(0, len(paths), batch_size):
        yield torch.stack([pil_to_tensor(Image.open(p).convert("RGB")) for p in paths[start : start + batch_size]]).float() / 255


def write_table(rows: list[dict], output_dir: Path) -> None:
    """results.json, results.csv and results.md (model, steps, FID-Whole, FID-Patch, CLIP, precision, recall)."""
    with atomic_path(output_dir / "results.json") as temporary:
        temporary.write_text(json.dumps(rows, indent=2))
    with atomic_path(output_dir / "results.csv") as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    with atomic_path(output_dir / "results.md") as temporary:
        temporary.write_text("\n".join(markdown_table(rows)) + "\n")


def _cell(value, digits: int) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: list[dict]) -> list[str]:
    """The lines of a Markdown table of evaluation rows (model, steps, FID-Whole, FID-Patch, CLIP,
    precision, recall; "n/a" where a row has no precision/recall)."""
    lines = [
        "| model | steps | FID-Whole | FID-Patch | CLIP | precision | recall |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    return lines + [
        f"| {r['model']} | {r['steps']} | {r['fid_whole']:.2f} | {r['fid_patch']:.2f} | {r['clip_score']:.2f} "
        f"| {_cell(r.get('precision'), 3)} | {_cell(r.get('recall'), 3)} |"
        for r in rows
    ]


@torch.no_grad()
def reference_features(metric: PrecisionRecall, references: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The references' features for precision/recall (its k-NN needs the features, not FID's sums;
    on the toy networks this is seconds, so they are not cached)."""
    metric.reset()
    for batch in references.split(batch_size):
        metric.update(batch.to(metric.device), real=True)
    return list(metric.real_features)


def evaluate(cfg: DictConfig) -> list[dict]:
    """Evaluate `cfg.target` at each of `cfg.steps`; returns the table rows."""
    validate_eval_config(cfg)
    # Metric networks first: missing weights fail before the model loads.
    fids = {name: instantiate_checked(cfg.metrics[name]) for name in ("fid_whole", "fid_patch")}
    clip_score = instantiate_checked(cfg.metrics.clip_score)
    check_patch_fits(fids["fid_patch"], cfg.data.resolution)
    datamodule = hydra.utils.instantiate(cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model_under_test(cfg, device)
    output_dir = Path(cfg.output_dir)

    prompts = list(datamodule.val_prompts)[: cfg.num_images]
    seeds = [cfg.seed + index for index in range(len(prompts))]
    references = (datamodule.validation_images()[: len(prompts)] + 1) / 2
    cache = ReferenceStatsCache(cfg.metrics.cache_dir)
    for fid in fids.values():
        fid.to(device)
        prepare_reference(fid, f"{reference_id(datamodule)}:n={len(prompts)}", lambda: references.split(cfg.batch_size), cache)
    clip_score.to(device)
    # Precision/recall on FID-Whole's view and network; more than k images are needed on each side.
    neighborhood = cfg.get("precision_recall", {}).get("neighborhood", 3)
    precision_recall = PrecisionRecall(fids["fid_whole"], neighborhood=neighborhood).to(device)
    with_precision_recall = len(prompts) > neighborhood
    if with_precision_recall:
        real_features = reference_features(precision_recall, references, cfg.batch_size)
    else:
        log.warning("precision/recall with k=%d need more than %d images; not computed", neighborhood, neighborhood)

    fingerprint = weights_fingerprint(model.unet)
    rows, grid = [], []
    for num_steps in step_counts(cfg.steps):
        folder = output_dir / "images" / f"steps_{num_steps}"
        paths = generate_images(
            model, prompts, seeds, num_steps, cfg.guidance_scale, cfg.data.resolution, folder, cfg.batch_size,
            fingerprint,
        )
        for metric in (*fids.values(), clip_score, precision_recall):
            metric.reset()
        if with_precision_recall:
            precision_recall.real_features.extend(real_features)
        batches = zip(load_images(paths, cfg.batch_size), range(0, len(paths), cfg.batch_size))
        for images, start in tqdm(batches, total=-(-len(paths) // cfg.batch_size), desc="features"):
            images = images.to(device)
            for fid in fids.values():
                fid.update(images, real=False)
            clip_score.update(images, prompts[start : start + len(images)])
            if with_precision_recall:
                precision_recall.update(images, real=False)
        row = {"model": model.name, "steps": num_steps}
        row.update({name: float(fid.compute()) for name, fid in fids.items()})
        row["clip_score"] = float(clip_score.compute())
        row.update(precision=None, recall=None)
        if with_precision_recall:
            precision, recall = precision_recall.compute()
            row.update(precision=float(precision), recall=float(recall))
        log.info("%s", row)
        rows.append(row)
        grid.append(next(load_images(paths[:GRID_PROMPTS], GRID_PROMPTS)))
    write_table(rows, output_dir)
    print("\n".join(markdown_table(rows)) + f"\n(also in {output_dir / 'results.md'})")  # the user asked for it
    with atomic_path(output_dir / "grid.png") as temporary:  # rows: step counts; columns: prompts
        save_image(make_grid(torch.cat(grid), nrow=len(grid[0]), padding=2), temporary, format="png")
    return rows
