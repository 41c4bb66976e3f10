"""The walkthrough notebook runs top to bottom against the shipped model, so it never rots."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "vit_walkthrough.ipynb"


def test_walkthrough_notebook_executes_and_draws_every_figure(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(NOTEBOOK.parents[1]))  # the kernel imports model/ from this checkout
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []  # only what this run produces counts
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()

    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    figures = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(figures) == 6  # patches, filters, position similarity, attention grid, distances, explanations
    printed = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    assert "49 patches of 4 x 4 pixels" in printed
    assert "predicted: Ankle boot" in printed and "true: Ankle boot" in printed
