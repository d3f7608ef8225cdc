"""The quick-start notebook runs from top to bottom (digits, tiny settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_executes(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("SEDENSE_NB_DATA", "digits")  # never the shared datasets, which a user's clone lacks
    monkeypatch.setenv("SEDENSE_NB_EPOCHS", "1")
    monkeypatch.setenv("SEDENSE_NB_IMAGE_SIZE", "16")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    resources = {"metadata": {"path": str(NOTEBOOK.parent)}}
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources=resources).execute()
    cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    outputs = "".join(o.get("text", "") for cell in cells for o in cell.get("outputs", []))
    assert "10 classes" in outputs and "validation accuracy" in outputs and "8 photos classified" in outputs
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
