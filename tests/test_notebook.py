"""notebooks/inspect_checkpoint.ipynb: runs top to bottom on the toy default; committed stripped."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "inspect_checkpoint.ipynb"


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def code_cell(notebook: nbformat.NotebookNode, marker: str) -> nbformat.NotebookNode:
    """The one code cell whose source contains `marker`."""
    (cell,) = [cell for cell in notebook.cells if cell.cell_type == "code" and marker in cell.source]
    return cell


def stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(out.text for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def images(cell: nbformat.NotebookNode) -> int:
    return sum("image/png" in out.get("data", {}) for out in cell.outputs)


@pytest.fixture(scope="module")
def executed(tmp_path_factory) -> nbformat.NotebookNode:
    """The notebook executed as Jupyter runs it: kernel `python3` of this interpreter, cwd notebooks/."""
    jupyter = tmp_path_factory.mktemp("jupyter")
    write_kernel_spec(jupyter / "kernels" / "python3")  # argv: this interpreter -m ipykernel_launcher
    kernel_tmp = tmp_path_factory.mktemp("kernel_tmp")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(kernel_tmp)}
    # One thread: the tiny model's ops are too small to split, and on 2 busy cores 2 threads ran
    # the notebook in 58 s instead of 17 s (measured).
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MPLBACKEND", None)  # the kernel's inline backend, so figures become image outputs
    notebook = read_notebook()
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(jupyter))  # found before any user or system kernel spec
        client.execute(env=env)  # raises CellExecutionError on the first failing cell
    notebook.metadata["kernel_tmp"] = str(kernel_tmp)  # for the clean-up test
    return notebook


def test_committed_notebook_is_stripped():
    for cell in read_notebook().cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def test_parameters_come_first_with_their_defaults():
    cell = next(cell for cell in read_notebook().cells if cell.cell_type == "code")
    assert "parameters" in cell.metadata.get("tags", [])
    for line in ("CHECKPOINT = None", "PROMPTS = [", "SEEDS = [", "STEPS = [1, 2, 4, 8]"):
        assert line in cell.source


def test_composes_the_packaged_config_from_any_folder():
    """The notebook composes `lightning_sdxl.CONF_DIR` (package data), not a checkout-relative conf/:
    it runs wherever the package is installed."""
    from lightning_sdxl import CONF_DIR

    source = code_cell(read_notebook(), "def tiny_run(").source
    assert "config_dir=str(CONF_DIR)" in source and "REPO" not in source
    assert "from lightning_sdxl import CONF_DIR" in code_cell(read_notebook(), "import torch").source
    assert (CONF_DIR / "train.yaml").is_file()


def test_leaves_no_temporary_run_behind(executed):
    assert not list(Path(executed.metadata["kernel_tmp"]).glob("inspect_checkpoint_*"))


def test_default_prompts_use_the_toy_teachers_words():
    from lightning_sdxl.data.toy_world import WORLDS

    scope = {}
    exec(next(cell for cell in read_notebook().cells if cell.cell_type == "code").source, scope)  # noqa: S102
    words = {w for v in (WORLDS["simple"].shapes, WORLDS["simple"].colours, WORLDS["simple"].backgrounds) for w in v}
    for prompt in scope["PROMPTS"]:
        named = set(prompt.split()) & {w for v in WORLDS["rich"].__dict__.values() if isinstance(v, tuple) for w in v}
        assert named <= words | set(WORLDS["simple"].sizes) | {"top", "bottom", "left", "right"}, prompt


def test_runs_without_errors(executed):
    errors = [out for cell in executed.cells if cell.cell_type == "code" for out in cell.outputs
              if out.output_type == "error"]
    assert not errors
    assert all(cell.execution_count for cell in executed.cells if cell.cell_type == "code")


def test_loads_the_tiny_run_and_prints_its_stage(executed):
    text = stdout(code_cell(executed, "DistillationModule.for_inference("))
    assert "stage 8to4, loss cond_adv, student lora (rank 4)" in text
    assert "trained 4 batches (global step 8" in text


def test_shows_the_sample_grid_and_latent_mse_per_step(executed):
    text = stdout(code_cell(executed, 'module.generate(PROMPTS, seeds, "teacher"'))
    for steps in (1, 2, 4, 8):
        assert f"student {steps} step(s): latent MSE to the teacher (8 steps)" in text
    assert images(code_cell(executed, "make_grid(")) == 1


def test_shows_discriminator_logits_norms_and_trajectory(executed):
    discriminator = code_cell(executed, "discriminator_logits(module)")
    assert "accuracy: real" in stdout(discriminator) and images(discriminator) == 1
    norms = code_cell(executed, "update_norms(module.pair)")
    assert {"down_blocks.0", "mid_block", "up_blocks.1"} <= {
        line.split(":")[0].strip() for line in stdout(norms).splitlines()
    }
    assert images(norms) == 1
    assert images(code_cell(executed, "sampling_path(8)")) == 1
