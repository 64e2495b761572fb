"""Running the top-level notebooks in tests: each keeps its parameters in its first code cell,
which a test replaces (a tiny checkpoint, its own output folder) before executing every cell."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


def run_notebook(name: str, parameters: str, timeout: int = 600) -> nbformat.NotebookNode:
    """Execute ``{name}.ipynb`` (cwd: the repository) with its first code cell replaced."""
    notebook = nbformat.read(REPO / f"{name}.ipynb", as_version=4)
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    first_code.source = parameters
    NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO)}}).execute()
    return notebook


def code_outputs(notebook: nbformat.NotebookNode) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", [])]
