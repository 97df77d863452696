"""``notebooks/inspect_samples.ipynb`` runs top to bottom (nbclient) on a tiny checkpoint trained here through
``train_demo`` (the ``lina fit`` path), every section draws its pictures, and the committed file carries no
outputs."""

from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from lina_pl.lightning.inspect import train_demo

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "inspect_samples.ipynb"
SECTIONS = (
    "Samples per class",
    "Classifier-free guidance sweep",
    "Generation order over the AR steps",
    "KV-gate maps and depthwise-conv kernels",
    "LASAD decay",
    "TensorBoard scalars",
)


def test_committed_notebook_has_no_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs == [] and cell.execution_count is None for cell in code)


def sections(notebook) -> dict[str, list]:
    """The code cells under each ``## `` header."""
    found, current = {}, None
    for cell in notebook.cells:
        if cell.cell_type == "markdown" and cell.source.startswith("## "):
            current = found.setdefault(cell.source.splitlines()[0][3:], [])
        elif cell.cell_type == "code" and current is not None:
            current.append(cell)
    return found


def test_notebook_runs_on_a_tiny_checkpoint(tmp_path, monkeypatch):
    ckpt = train_demo(tmp_path / "demo", steps=2, generator="lina_c2i_tiny", resolution=8)
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    assert (tmp_path / "demo/config.yaml").is_file() and (tmp_path / "demo/digits8/manifest.json").is_file()
    monkeypatch.setenv("LINA_NOTEBOOK_CKPT", str(ckpt))
    monkeypatch.setenv("LINA_NOTEBOOK_RUN_DIR", str(tmp_path / "demo/run"))
    monkeypatch.delenv("LINA_NOTEBOOK_LASAD_CKPT", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, when a cell fails
    outputs = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    found = sections(notebook)
    assert tuple(found) == SECTIONS
    for title, cells in found.items():
        images = [o for cell in cells for o in cell.outputs if "image/png" in o.get("data", {})]
        assert images, f"section {title!r} drew no picture"
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "LINA_NOTEBOOK_LASAD_CKPT is not set" in printed and "no TensorBoard" not in printed
