"""The Colab notebooks (``colab/*.ipynb``) run top to bottom, headless, in their smoke mode.

Each notebook runs in a fresh IPython kernel of this interpreter (a kernelspec written to a
temporary directory, so neither ``PATH`` nor an installed ``python3`` kernelspec decides which
Python runs it), with the repository root as working directory, the offline dataset in a
temporary tfds data_dir and ``JPROMPT_NOTEBOOK_SMOKE=1``: the demo configs on tiny splits for
one epoch, on one CPU device as on a Colab CPU runtime (the 8 fake devices of ``conftest.py``
would double the programs XLA compiles). A cell that raises fails the test; the notebook's last
cell prints a JSON summary, from which each test checks what the notebook claims to show.
"""

import json
import os
import re
import sys

import helpers
import nbformat
import pytest
from ipykernel import kernelspec
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

COLAB = helpers.ROOT / "colab"
NOTEBOOKS = ("quickstart", "prompt_inversion", "vpt_vtab")
BADGE_URL = "https://colab.research.google.com/github/jprompt/jprompt/blob/main/colab/{}.ipynb"
KERNEL_NAME = "jprompt-notebook-test"
CELL_TIMEOUT_S = 600
# The demo's jprompt_shapes/colors: 8 classes.
CHANCE = 1 / 8


def load(name: str):
    return nbformat.read(COLAB / f"{name}.ipynb", as_version=4)


@pytest.fixture(scope="module")
def kernel_spec_manager(tmp_path_factory):
    """Kernelspecs holding one kernel: IPython on ``sys.executable``."""
    kernels = tmp_path_factory.mktemp("kernels")
    kernelspec.write_kernel_spec(str(kernels / KERNEL_NAME))
    manager = KernelSpecManager(kernel_dirs=[str(kernels)])
    assert manager.get_kernel_spec(KERNEL_NAME).argv[0] == sys.executable
    return manager


def execute(name: str, kernel_spec_manager, data_dir, workdir) -> dict:
    """Run the notebook in smoke mode; return the JSON summary its last cell prints."""
    notebook = load(name)
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=helpers.xla_flags_with_devices(1),
        JPROMPT_NOTEBOOK_SMOKE="1",
        JPROMPT_NOTEBOOK_WORKDIR=str(workdir),
        TFDS_DATA_DIR=str(data_dir),
        PYTHONPATH=os.pathsep.join(filter(None, [str(helpers.ROOT), env.get("PYTHONPATH")])),
    )
    kernel = AsyncKernelManager(kernel_name=KERNEL_NAME, kernel_spec_manager=kernel_spec_manager)
    client = NotebookClient(
        notebook,
        km=kernel,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(helpers.ROOT)}},
    )
    client.execute(env=env)  # raises CellExecutionError, naming the cell, if any cell fails
    last = notebook.cells[-1]
    text = "".join(out.get("text", "") for out in last.outputs if out.output_type == "stream")
    return json.loads(text)


def test_stored_without_outputs_with_badge_and_form_fields():
    for name in NOTEBOOKS:
        notebook = load(name)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert all(not cell.outputs and cell.execution_count is None for cell in code), name
        assert BADGE_URL.format(name) in notebook.cells[0].source, name
        assert any(re.search(r"#@param", cell.source) for cell in code), name
        assert any("JPROMPT_NOTEBOOK_SMOKE" in cell.source for cell in code), name


def test_quickstart(kernel_spec_manager, shapes_data_dir, tmp_path):
    summary = execute("quickstart", kernel_spec_manager, shapes_data_dir, tmp_path)
    assert summary["backend"] == "cpu" and summary["setting"] == "demo"
    assert summary["chance"] == pytest.approx(CHANCE)
    # Through the tiny CLIP's frozen zero-shot head only the prompt trains (README's counts).
    assert summary["pgn_trainable_params"] == 342_384
    assert summary["vp_trainable_params"] == 2_304
    for run in ("pgn", "vp"):
        assert summary[f"{run}_test_accuracy"] > CHANCE, run
        first, last = summary[f"{run}_train_loss_first_last"]  # read from the event files
        assert last < first, run
        results = json.loads((tmp_path / run / "results.json").read_text())
        assert results["test"]["accuracy"] == summary[f"{run}_test_accuracy"]
        assert results["test"]["num_examples"] == 256
    # The pictures shown are the trainer's, after the last step (1280 / 16 = 80 steps).
    assert summary["pictures"] == {
        "vp/prompted": str(tmp_path / "vp" / "images" / "prompted_80.png"),
        "pgn/library_usage_mask": str(tmp_path / "pgn" / "images" / "library_usage_mask_80.png"),
    }


def test_prompt_inversion(kernel_spec_manager, shapes_data_dir, tmp_path):
    summary = execute("prompt_inversion", kernel_spec_manager, shapes_data_dir, tmp_path)
    assert summary["backbone"] == "vit_tiny8"
    # 32px images of 4x4 patches of 8 px; K=8 prompt patches fill ceil(8 / 4) = 2 extra rows.
    assert summary["image_shape"] == [32, 32, 3]
    assert summary["prompted_shape"] == [48, 32, 3]
    assert summary["queries"] == 32
    # The unmodified model behind HTTP answers what the latent PGN predicts, on every image.
    assert summary["agreement"] == 1.0
    assert summary["max_logit_deviation_float"] < 1e-3
    assert summary["test_accuracy"] > CHANCE
    assert (tmp_path / "pgn_client.npz").stat().st_size > 0


def test_vpt_vtab(kernel_spec_manager, shapes_data_dir, tmp_path):
    summary = execute("vpt_vtab", kernel_spec_manager, shapes_data_dir, tmp_path)
    assert summary["dataset"] == "jprompt_shapes/colors"
    # configs/vpt.py's demo counts: 10 tokens of width 64 and a 520-parameter head; deep has
    # 10 tokens before each of the 2 layers.
    assert summary["VPT-shallow_trainable_params"] == 1_160
    assert summary["VPT-deep_trainable_params"] == 1_800
    for name, arg in (("VPT-shallow", "demo"), ("VPT-deep", "demo,deep")):
        assert summary[f"{name}_test_accuracy"] > CHANCE, name
        # The table (jprompt.tools.tables over the runs' work directories) has one row per run.
        row = summary["table_rows"][name]
        assert row["setting"] == arg and row["selected"]
        assert row["test"] == [pytest.approx(100 * summary[f"{name}_test_accuracy"])]
        assert (tmp_path / name / "run.json").exists()
