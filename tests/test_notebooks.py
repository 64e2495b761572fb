"""The embedding and probe notebooks run top to bottom (nbclient), on the bundled sample.

Each notebook keeps its parameters in its first code cell; the tests replace that cell to point
at a tiny checkpoint and at their own output folder, then execute every cell.
"""

from pathlib import Path

import nbformat
import pytest
import torch

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
LEGACY_HOUR = False
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
