"""Validation image grid: fixed prompts and seeds, teacher (n steps) above student (METHOD.md 5),
labelled: the model and its steps left of each row, the prompt above each column."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image, ImageDraw, ImageFont
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from lightning_sdxl.io import atomic_path

MIN_CELL = 128  # smaller images (the toy world's 32 px) are enlarged (nearest) so labels fit above them
LABEL_LINES = 3  # a column label's lines at most; a longer prompt ends in "..."
PAD = 4


def _text_width(font, text: str) -> int:
    return math.ceil(font.getlength(text))


def _wrap(font, text: str, width: int, max_lines: int) -> list[str]:
    """`text` broken into lines of at most `width` pixels; beyond `max_lines` cut with "..."."""
    words = []
    for word in text.split():  # a word wider than the cell is split into pieces that fit
        while len(word) > 1 and _text_width(font, word) > width:
            cut = next(n for n in range(len(word) - 1, 0, -1) if _text_width(font, word[:n]) <= width or n == 1)
            words.append(word[:cut])
            word = word[cut:]
        words.append(word)
    lines: list[str] = []
    for word in words:
        if lines and _text_width(font, f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    if len(lines) > max_lines:
        last = lines[max_lines - 1]
        while last and _text_width(font, last + "...") > width:
            last = last[:-1]
        lines = lines[: max_lines - 1] + [last + "..."]
    return lines or [""]


def default_font(cell_width: int):
    """PIL's default font (ImageDraw's), sized to about 1/32 of a cell's width, at least 10 px
    (Pillow < 10.1 or without FreeType: the fixed-size bitmap default)."""
    try:
        return ImageFont.load_default(size=max(10, cell_width // 32))
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def labelled_grid(
    rows: list[torch.Tensor],
    row_labels: list[str],
    column_labels: list[str],
    min_cell: int = MIN_CELL,
    max_cell: int | None = None,
    label_lines: int = LABEL_LINES,
) -> Image.Image:
    """A white-background grid with text labels in PIL's default font (ImageFont.load_default()).

    Args:
        rows: one (C, 3, H, W) float tensor in [0, 1] per row, all of the same shape.
        row_labels: one label per row, drawn left of it (wrapped at ~24 characters).
        column_labels: one label per column, drawn above it (wrapped to the cell width, at most
            `label_lines` lines).
        min_cell: images narrower than this are enlarged by an integer factor (nearest).
        max_cell: images wider than this are shrunk by an integer factor (None: never).
    """
    if len(rows) != len(row_labels) or any(len(row) != len(column_labels) for row in rows):
        raise ValueError("one label per row and one per column")
    height, width = rows[0].shape[-2:]
    if max_cell and width > max_cell:
        shrink = math.ceil(width / max_cell)
        cell_w, cell_h = width // shrink, height // shrink
    else:
        scale = max(1, math.ceil(min_cell / width))
        cell_w, cell_h = width * scale, height * scale
    font = default_font(cell_w)
    line_height = sum(font.getmetrics()) + 2
    column_lines = [_wrap(font, label, cell_w, label_lines) for label in column_labels]
    row_lines = [textwrap.wrap(label, 24) or [""] for label in row_labels]
    left = max(_text_width(font, line) for lines in row_lines for line in lines) + 2 * PAD
    top = max(len(lines) for lines in column_lines) * line_height + 2 * PAD
    grid = Image.new(
        "RGB", (left + len(column_labels) * (cell_w + PAD) + PAD, top + len(rows) * (cell_h + PAD)), "white"
    )
    draw = ImageDraw.Draw(grid)
    for column, lines in enumerate(column_lines):
        x = left + column * (cell_w + PAD)
        for index, line in enumerate(lines):
            draw.text((x, PAD + index * line_height), line, fill="black", font=font)
    for row_index, (images, lines) in enumerate(zip(rows, row_lines)):
        y = top + row_index * (cell_h + PAD)
        label_top = y + (cell_h - len(lines) * line_height) // 2
        for index, line in enumerate(lines):
            draw.text((PAD, label_top + index * line_height), line, fill="black", font=font)
        for column, image in enumerate(images):
            tile = to_pil_image(image.float().clamp(0, 1).cpu())
            if tile.size != (cell_w, cell_h):
                tile = tile.resize((cell_w, cell_h), Image.NEAREST if cell_w > width else Image.LANCZOS)
            grid.paste(tile, (left + column * (cell_w + PAD), y))
    return grid


def row_label(pl_module: L.LightningModule, row: str) -> str:
    """"teacher, 8 steps, CFG 6" / "student, 4 steps" (a distillation module); "guided, 32 steps,
    CFG 5" / "unguided, 32 steps" (a teacher being trained); the key itself otherwise."""
    hparams, stage = getattr(pl_module, "hparams", {}), getattr(pl_module, "stage", None)
    if row == "teacher" and stage is not None:
        steps = hparams.get("validation_teacher_steps") or stage.teacher_steps
        scale = stage.guidance_scale
        return f"teacher, {steps} steps" + (f", CFG {scale:g}" if scale > 1 else "")
    if row == "student" and stage is not None:
        return f"student, {stage.student_steps} steps"
    if row in ("guided", "unguided"):
        label = f"{row}, {hparams.get('validation_steps')} steps"
        scale = hparams.get("validation_guidance_scale", 1) or 1
        return label + (f", CFG {scale:g}" if row == "guided" else "")
    return row


class SampleGrid(L.Callback):
    """Writes `samples/step_XXXXXX.png` under `dirpath` and logs the grid to TensorBoard (and to
    Weights & Biases under logger=wandb).

    Rows: the image entries of the module's `validation_outputs` (teacher, student; or a teacher's
    guided, unguided samples) in order, labelled with the model and its steps; columns: the
    validation prompts in seed order, gathered from all ranks, labelled with the prompt (wrapped,
    cut after three lines). Reads what the module's `validation_step` left in `validation_outputs`
    and the prompts of the validation batches.

    Args:
        dirpath: folder of the PNG grids (the run directory's `samples/`).
    """

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.prompts: dict[int, str] = {}  # seed -> prompt, this rank's validation batches

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.prompts = {}

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if isinstance(batch, dict) and "prompt" in batch and "seed" in batch:
            self.prompts.update(zip((int(seed) for seed in batch["seed"]), batch["prompt"]))

    def _all_prompts(self) -> dict[int, str]:
        """Every rank's seed -> prompt (a collective under DDP: every rank calls it)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return dict(self.prompts)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self.prompts)
        return {seed: prompt for part in gathered for seed, prompt in (part or {}).items()}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        outputs = pl_module.validation_outputs
        if trainer.sanity_checking or not outputs:
            return
        rows = {}
        seeds = pl_module.all_gather(torch.cat([output["seed"] for output in outputs])).reshape(-1)
        for row in (key for key in outputs[0] if key != "seed"):
            images = pl_module.all_gather(torch.cat([output[row] for output in outputs]))
            rows[row] = images.reshape(-1, *images.shape[-3:])
        prompts = self._all_prompts()
        if not trainer.is_global_zero:
            return
        # One column per seed, in seed order (a DistributedSampler may repeat items to pad).
        unique = [int(seed) for seed in seeds.unique(sorted=True)]
        order = [int((seeds == seed).nonzero()[0]) for seed in unique]
        grid = labelled_grid(
            [images[order] for images in rows.values()],
            [row_label(pl_module, row) for row in rows],
            [prompts.get(seed, f"seed {seed}") for seed in unique],
        )
        step = pl_module.batches_trained
        with atomic_path(self.dirpath / f"step_{step:06d}.png") as temporary:
            grid.save(temporary, format="png")
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"samples/{'_over_'.join(rows)}", pil_to_tensor(grid), global_step=step)
            elif isinstance(logger, WandbLogger):  # its x-axis, trainer/global_step, is Lightning's step
                logger.log_image(key="samples", images=[grid], step=trainer.global_step, caption=[f"batch {step}"])
