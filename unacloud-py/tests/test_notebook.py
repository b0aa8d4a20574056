"""examples/python/experiment.ipynb runs top to bottom, headless (nbclient)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOK = REPO / "examples" / "python" / "experiment.ipynb"


def text_of(cell: dict) -> str:  # type: ignore[type-arg]
    out = []
    for o in cell.get("outputs", []):
        if "text" in o:
            out.append(o["text"])
        for key in ("text/plain", "text/markdown", "text/html"):
            if key in o.get("data", {}):
                out.append(o["data"][key])
    return "\n".join(out)


def test_the_notebook_runs_top_to_bottom(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("pandas")
    # The suite boots real guests in test_experiment only; here the cell must say so.
    monkeypatch.setenv("UNACLOUD_NOTEBOOK_REAL_VMS", "0")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "every code cell ran"
    outputs = [text_of(c) for c in code]
    assert not any(o.get("output_type") == "error" for c in code for o in c.get("outputs", []))
    everything = "\n".join(outputs)
    assert "<DeploymentReport 6 VMs: 6 created, 0 failed, 0 cancelled>" in everything
    assert "Real VMs skipped" in everything and "UNACLOUD_NOTEBOOK_REAL_VMS=0" in everything
    assert "exact: True" in everything
    assert outputs[-1].strip() == "done"
    assert os.environ["UNACLOUD_NOTEBOOK_REAL_VMS"] == "0"
