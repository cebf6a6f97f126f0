"""notebooks/S5.ipynb runs top to bottom in its quick mode."""
import nbformat
from nbclient import NotebookClient

from conftest import ROOT, data_dir


def test_notebook_runs(tmp_path, monkeypatch):
    notebook = nbformat.read(ROOT / "notebooks" / "S5.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # stored clean
    monkeypatch.setenv("TRAINKIT_QUICK", "1")
    monkeypatch.setenv("TRAINKIT_DATA_DIR", str(data_dir()))
    client = NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError if any cell fails
    outputs = [o for cell in notebook.cells for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "Test set: Average loss:" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the plots were drawn
