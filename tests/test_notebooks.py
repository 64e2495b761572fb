"""The embedding and probe notebooks run top to bottom (nbclient), on the bundled sample.

Each notebook keeps its parameters in its first code cell; the tests replace that cell to point
at a tiny checkpoint and at their own output folder, then execute every cell. The published
``moe_experiments.ipynb`` is kept as published: its test replaces only the assignments of its
paths and model size, wherever they are.
"""

import importlib.util
import os
import re
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from conftest import REAL_SAMPLE
from models.moe_mae import build_mae
from notebook_runner import code_outputs, run_notebook

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def outputs_text(notebook) -> str:
    return "\n".join(output.get("text", "") for output in code_outputs(notebook))


def test_notebooks_are_committed_without_outputs():
    for path in REPO.glob("*.ipynb"):
        notebook = nbformat.read(path, as_version=4)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, path.name


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "pretrained_XXS_best.pth"
    torch.save({"model_state": build_mae("XXS").state_dict()}, path)
    return path


def test_bigearthnet_notebooks(tmp_path, checkpoint):
    embed = run_notebook("compute_embeddings_bigearthnet", f"""
CHECKPOINT = {str(checkpoint)!r}
MODEL_SIZE = "XXS"
DATA_ROOT = "sample_dataset"
SPLITS = {{"train": "sample_dataset/bigearthnet-train.csv",
          "test": "sample_dataset/bigearthnet-test.csv"}}
OUTPUT_DIR = {str(tmp_path)!r}
POOLING = "all"
NORMED = False
LEGACY_HOUR = None
BATCH_SIZE = 64
""")
    assert "train: x (168, 11340)" in outputs_text(embed)
    probe = run_notebook("eval_logistic_regression_bigearthnet", f"""
TRAIN_NPZ = {str(tmp_path / "bigearthnet_XXS_all_train.npz")!r}
TEST_NPZ = {str(tmp_path / "bigearthnet_XXS_all_test.npz")!r}
POOL = True
MAX_ITER = 100
""")
    assert "linear probe: micro mAP" in outputs_text(probe)


def test_eurosat_notebooks(tmp_path, checkpoint):
    embed = run_notebook("compute_embeddings_eurosat", f"""
CHECKPOINT = {str(checkpoint)!r}
MODEL_SIZE = "XXS"
EUROSAT_ROOT = "sample_dataset/eurosat_l"
SPLITS = {{"train": "sample_dataset/eurosat_l/eurosat-train.txt",
          "test": "sample_dataset/eurosat_l/eurosat-test.txt"}}
OUTPUT_DIR = {str(tmp_path)!r}
POOLING = "cls"
NORMALIZATION = "bigearthnet"
BATCH_SIZE = 64
""")
    assert "train: x (120, 108)" in outputs_text(embed)
    probe = run_notebook("eval_logistic_regression_eurosat", f"""
TRAIN_NPZ = {str(tmp_path / "eurosat_XXS_cls_train.npz")!r}
TEST_NPZ = {str(tmp_path / "eurosat_XXS_cls_test.npz")!r}
MAX_ITER = 200
""")
    assert "linear probe OA" in outputs_text(probe)


def test_missing_checkpoint_stops_with_a_clear_message(tmp_path):
    with pytest.raises(Exception, match="run `make demo` first"):
        run_notebook("compute_embeddings_eurosat", f"""
CHECKPOINT = {str(tmp_path / "missing.pth")!r}
MODEL_SIZE = "XXS"
EUROSAT_ROOT = "sample_dataset/eurosat_l"
SPLITS = {{}}
OUTPUT_DIR = {str(tmp_path)!r}
POOLING = "cls"
NORMALIZATION = "bigearthnet"
BATCH_SIZE = 64
""")


def run_with_assignments(name: str, assignments: dict, stand_ins: Path) -> nbformat.NotebookNode:
    """Execute ``{name}.ipynb`` with each ``variable = ...`` line of ``assignments`` (exactly one
    in the notebook) set to the given value. torchvision, which the published notebook imports
    for ``transforms.Compose`` only, is not a dependency of this project: when it is not
    installed, the kernel imports a stand-in whose ``Compose`` is the project's."""
    notebook = nbformat.read(REPO / f"{name}.ipynb", as_version=4)
    for variable, value in assignments.items():
        line = re.compile(rf"^{re.escape(variable)} = .*$", re.MULTILINE)
        cells = [cell for cell in notebook.cells
                 if cell.cell_type == "code" and line.search(cell.source)]
        assert len(cells) == 1 and len(line.findall(cells[0].source)) == 1, variable
        cells[0].source = line.sub(lambda _: f"{variable} = {value!r}", cells[0].source)
    env_path = [str(REPO)]
    if importlib.util.find_spec("torchvision") is None:
        package = stand_ins / "torchvision"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("from . import transforms\n")
        (package / "transforms.py").write_text(
            "from transformation.transformer import Compose  # noqa: F401\n")
        env_path.insert(0, str(stand_ins))
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(env_path + ([previous] if previous else []))
    try:
        NotebookClient(notebook, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(REPO)}}).execute()
    finally:
        if previous is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = previous
    return notebook


def check_layer_report(notebook) -> None:
    """The published layer report ran: usage bars, routing dots, contribution and ablation
    maps, and the returned summary of layer 0 (3 experts, top-2 over 100 patches)."""
    outputs = code_outputs(notebook)
    assert sum("image/png" in output.get("data", {}) for output in outputs) == 4
    (summary,) = [output["data"]["text/plain"] for output in outputs
                  if output.get("output_type") == "execute_result"]
    assert "'num_experts': 3" in summary and "'moe_loss':" in summary
    usage = re.search(r"'usage_image': array\(\[([^\]]*)\]\)", summary).group(1)
    assert sum(int(count) for count in usage.split(",")) == 200
    assert "Using device:" in outputs_text(notebook)


def test_published_moe_experiments_notebook_on_the_bundled_sample(tmp_path, checkpoint):
    notebook = run_with_assignments("moe_experiments", {
        "model_size": "XXS", "checkpoint_path": str(checkpoint)}, tmp_path / "stand_ins")
    check_layer_report(notebook)


def test_published_moe_experiments_notebook_on_the_real_tiles(tmp_path, checkpoint):
    """The real sample has a patch without a label file; the notebook reads no labels."""
    if not (REAL_SAMPLE / "samples.csv").is_file():
        pytest.skip(f"real BEN-L sample not found at {REAL_SAMPLE} (shared data not mounted)")
    notebook = run_with_assignments("moe_experiments", {
        "model_size": "XXS", "checkpoint_path": str(checkpoint),
        "data_csv": str(REAL_SAMPLE / "samples.csv"), "data_path": str(REAL_SAMPLE)},
        tmp_path / "stand_ins")
    check_layer_report(notebook)
