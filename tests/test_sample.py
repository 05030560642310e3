"""python -m lightning_sdxl.sample: an export, a checkpoint and a release of every step count give the
student's own images, with readable names and a labelled grid; bad input fails in one line first."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning
import pytest
import torch
from PIL import Image
from test_export import build_perturbed_module
from torchvision.transforms.functional import pil_to_tensor

from lightning_sdxl import sample as sample_cli
from lightning_sdxl.callbacks.sample_grid import SampleGrid, labelled_grid, row_label
from lightning_sdxl.diffusion.stage_grid import StageGrid
from lightning_sdxl.export import INFO_FILE, export_student
from lightning_sdxl.recipe import RELEASES_FILE, assemble_teacher, write_releases

PROMPTS = ["a large red circle at the top left on a white background", "a small blue square"]


def build_module(tiny_sdxl_path: str, root: Path, *overrides: str):
    """A tiny student moved away from its teacher (so a sampler that used the teacher would fail)."""
    return build_perturbed_module(tiny_sdxl_path, root / "run", *overrides)


def student_images(module, prompts: list[str], seeds: list[int]) -> torch.Tensor:
    """The module's own student samples, as the PNGs hold them (uint8)."""
    latents = module.generate(prompts, torch.tensor(seeds), "student", module.stage.student_steps)
    return (module.decode_latents(latents) * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def png(path: Path) -> torch.Tensor:
    return pil_to_tensor(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def release(tiny_sdxl_path, tmp_path_factory):
    """A hand-built release: a 4-step LoRA student (epsilon) and a 1-step x0 full student, each
    exported as the recipe's stage result (export/, teacher/), with releases.json; the 4-step one also
    as a Lightning checkpoint (trainable weights only, as training writes them)."""
    root = tmp_path_factory.mktemp("release")
    phases = {}
    for steps, name, overrides in (
        (4, "01_8to4_c", ["stage=8to4"]),
        (1, "03_2to1_c", ["stage=2to1", "prediction=sample", "student=full"]),
    ):
        module = build_module(tiny_sdxl_path, root / name, *overrides)
        assert module.stage.student_steps == steps and module.hparams.resolution == 64
        export_student(module, root / name / "export", single_file=steps == 4)  # the 4-step one: with its ComfyUI file
        assemble_teacher(Path(tiny_sdxl_path), root / name / "export", root / name / "teacher")
        phases[steps] = (root / name, module)
    write_releases(root, {steps: folder for steps, (folder, _) in phases.items()})
    module = phases[4][1]
    checkpoint = {
        "state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
        "pytorch-lightning_version": lightning.__version__, "global_step": 0, "epoch": 0,
    }
    module.on_save_checkpoint(checkpoint)
    (root / "checkpoints").mkdir()
    torch.save(checkpoint, root / "checkpoints" / "last.ckpt")
    return root, {steps: module for steps, (_, module) in phases.items()}


def run(*argv: str) -> list[dict]:
    """The command in-process; returns samples.json."""
    out = Path(argv[argv.index("--out") + 1])
    sample_cli.main(list(argv))
    return json.loads((out / sample_cli.INDEX_FILE).read_text())


def test_export_samples_are_the_students_images_with_readable_names(release, tmp_path):
    root, modules = release
    export = root / "01_8to4_c" / "export"
    info = json.loads((export / INFO_FILE).read_text())
    assert "/" not in info["base_model"], "the export names its base by folder name only"
    records = run(str(export), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seed", "3", "--out", str(tmp_path))
    # The base was found by name (no --base); 64 px from the export's ComfyUI workflow; 4 steps, epsilon.
    assert [(r["steps"], r["prompt"], r["seed"], r["resolution"], r["prediction_type"]) for r in records] == [
        (4, PROMPTS[0], 3, 64, "epsilon"), (4, PROMPTS[1], 3, 64, "epsilon"),
    ]
    assert records[0]["file"] == "01-8to4-c_4step_p00_a-large-red-circle-at-the-top-left-on-a_seed3.png"
    expected = student_images(modules[4], PROMPTS, [3, 3])
    for record, image in zip(records, expected):
        assert (png(tmp_path / record["file"]).int() - image.int()).abs().max() <= 1, record["file"]
    grid = Image.open(tmp_path / sample_cli.GRID_FILE)
    assert grid.width > 2 * 128 and grid.height > 128  # two 64 px columns enlarged to 128, labels above
    assert not list(tmp_path.glob(".staging-*")), "staging folder left"


def test_release_samples_every_step_count_and_steps_picks_one(release, tmp_path):
    root, modules = release
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text(f"{PROMPTS[0]}\n\n  {PROMPTS[1]}  \n")
    out = tmp_path / "all"
    records = run(str(root / RELEASES_FILE), "--prompts-file", str(prompts_file), "--num-images-per-prompt", "2",
                  "--out", str(out))
    assert [(r["model"], r["steps"], r["prompt"], r["seed"]) for r in records] == [
        (root.name, steps, prompt, seed)
        for steps in (4, 1) for prompt in PROMPTS for seed in (0, 1)
    ]
    assert {r["steps"]: r["prediction_type"] for r in records} == {4: "epsilon", 1: "sample"}
    for steps in (4, 1):  # each row is that stage's student (the x0 one read as x0)
        mine = [r for r in records if r["steps"] == steps]
        expected = student_images(modules[steps], [r["prompt"] for r in mine], [r["seed"] for r in mine])
        for record, image in zip(mine, expected):
            assert (png(out / record["file"]).int() - image.int()).abs().max() <= 1, record["file"]
    assert (out / sample_cli.GRID_FILE).exists() and len(list(out.glob("*.png"))) == 8 + 1

    one = run(str(root), "--steps", "1", "--prompt", PROMPTS[1], "--out", str(tmp_path / "one"))  # the run folder
    assert [(r["steps"], r["prompt"], r["seed"]) for r in one] == [(1, PROMPTS[1], 0)]
    same = png(tmp_path / "one" / one[0]["file"]).int() - png(out / records[6]["file"]).int()
    assert same.abs().max() <= 1  # the same image (batched alone: float rounding)


def test_checkpoint_samples_equal_the_exports(release, tmp_path):
    root, _ = release
    export = run(str(root / "01_8to4_c" / "export"), "--prompt", PROMPTS[0], "--out", str(tmp_path / "e"))
    checkpoint = run(str(root / "checkpoints" / "last.ckpt"), "--prompt", PROMPTS[0], "--out", str(tmp_path / "c"))
    assert checkpoint[0]["steps"] == 4 and checkpoint[0]["model"] == f"{root.name}/last"
    difference = png(tmp_path / "c" / checkpoint[0]["file"]).int() - png(tmp_path / "e" / export[0]["file"]).int()
    assert difference.abs().max() <= 1


def _fail_on_load(*args, **kwargs):
    raise AssertionError("a model loaded before the input was checked")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["{root}/nowhere", "--prompt", "a"], "does not exist: give a Lightning checkpoint (.ckpt), an export folder"),
        (["{export}"], 'no prompts: give --prompt "..."'),
        (["{export}", "--prompts-file", "{root}/absent.txt"], "--prompts-file {root}/absent.txt does not exist"),
        (["{root}/releases.json", "--prompt", "a", "--steps", "2"], "has 4, 1 steps; pick one of them"),
        (["{export}", "--prompt", "a", "--seeds", "1", "2", "--num-images-per-prompt", "2"], "not both"),
        (["{export}", "--prompt", "a", "--base", "{root}/nowhere"], "--base {root}/nowhere does not exist"),
        (["{export}", "--prompt", "a", "--resolution", "60"], "a multiple of 8"),
        (["{moved}", "--prompt", "a"], "names its base model 'somewhere-else-sdxl'"),
        (["{export}", "--prompt", "a", "--device", "tpu9"], "give cuda, cuda:N or cpu"),
    ],
    ids=["missing-model", "no-prompts", "missing-prompts-file", "unknown-steps", "seeds-and-count", "missing-base",
         "bad-resolution", "unknown-base", "bad-device"],
)
def test_bad_input_fails_in_one_line_before_any_model_loads(release, tmp_path, monkeypatch, capsys, argv, message):
    root, _ = release
    export = root / "01_8to4_c" / "export"
    moved = tmp_path / "moved"
    shutil.copytree(export, moved)
    info = json.loads((moved / INFO_FILE).read_text())
    (moved / INFO_FILE).write_text(json.dumps({**info, "base_model": "somewhere-else-sdxl"}))
    monkeypatch.setattr(sample_cli, "load_target", _fail_on_load)
    fill = {"root": root, "export": export, "moved": moved}
    with pytest.raises(SystemExit) as raised:
        sample_cli.main([arg.format(**fill) for arg in argv] + ["--out", str(tmp_path / "out")])
    assert raised.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("Error: "), error
    assert message.format(**fill) in error, error
    assert not (tmp_path / "out").exists(), "nothing may be written before the input is checked"


def test_labelled_grid_labels_rows_and_columns():
    red = torch.zeros(3, 3, 32, 32)
    red[:, 0] = 1
    rows = [red, torch.ones(3, 3, 32, 32)]
    grid = labelled_grid(rows, ["teacher, 8 steps", "student, 4 steps"], ["a red circle", "x" * 200, ""])
    pixels = pil_to_tensor(grid)
    # Cells enlarged to 128 px (nearest); a white label band above and left of them holds dark text.
    is_red = (pixels == torch.tensor([255, 0, 0]).view(3, 1, 1)).all(0)
    assert is_red.sum() == 3 * 128 * 128
    top, left = int(is_red.any(1).nonzero()[0]), int(is_red.any(0).nonzero()[0])
    assert top > 10 and left > 10 and (pixels[:, :top] < 128).any() and (pixels[:, :, :left] < 128).any()
    with pytest.raises(ValueError, match="one label per row"):
        labelled_grid(rows, ["one"], ["a", "b", "c"])


class _Module:
    """What SampleGrid reads of a DistillationModule."""

    batches_trained = 7

    def __init__(self):
        self.hparams = {"validation_teacher_steps": None}
        self.stage = StageGrid(8, 4, guidance_scale=6.0)
        red = torch.zeros(2, 3, 32, 32)
        red[:, 0] = 1
        self.validation_outputs = [{"teacher": red, "student": torch.ones(2, 3, 32, 32), "seed": torch.tensor([1, 0])}]

    def all_gather(self, tensor):
        return tensor


class _Trainer:
    sanity_checking, is_global_zero, loggers, global_step = False, True, [], 14


def test_sample_grid_callback_writes_a_labelled_grid(tmp_path):
    module, callback = _Module(), SampleGrid(str(tmp_path))
    assert [row_label(module, row) for row in ("teacher", "student")] == ["teacher, 8 steps, CFG 6", "student, 4 steps"]
    callback.on_validation_epoch_start(_Trainer(), module)
    batch = {"prompt": ["second prompt", "first prompt"], "seed": torch.tensor([1, 0])}
    callback.on_validation_batch_end(_Trainer(), module, None, batch, 0)
    callback.on_validation_epoch_end(_Trainer(), module)
    grid = pil_to_tensor(Image.open(tmp_path / "step_000007.png"))
    is_red = (grid == torch.tensor([255, 0, 0]).view(3, 1, 1)).all(0)  # the teacher row, two columns of 128 px
    assert is_red.sum() == 2 * 128 * 128
    assert callback.prompts == {0: "first prompt", 1: "second prompt"}
