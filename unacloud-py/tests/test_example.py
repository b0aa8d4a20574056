"""The study script runs headless and writes a non-empty PNG."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


STUDY = REPO / "examples" / "python" / "snapshot_study.py"


def test_study_script_writes_a_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "study.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    # No real-VM series here (the suite boots real guests in test_experiment only).
    proc = subprocess.run(
        [sys.executable, str(STUDY), "--nodes", "4", "8", "16", "--tokens", "200", "--seeds", "2",
         "--real-nodes", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "figure written" in proc.stdout
    assert "simulated only: no real-VM series (no --real-nodes given)" in proc.stdout
    assert out.stat().st_size > 1000
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def load_study() -> ModuleType:
    spec = importlib.util.spec_from_file_location("snapshot_study", STUDY)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_study_figure_has_error_bars_counts_and_zero_based_axes() -> None:
    pytest.importorskip("matplotlib")
    study = load_study()
    rows = study.study([4, 8], tokens=200, seeds=2)
    for r in rows:
        assert r["source"] == "simulated" and r["n"] >= 2
        assert r["global_ms_sd"] >= 0 and r["overhead_ms"] > 0
        assert r["global_ms"] >= r["local_ms"]
    fig = study.plot(rows, [])
    assert len(fig.axes) == 2 and "simulated only" in fig._suptitle.get_text()
    for ax in fig.axes:
        assert ax.get_ylim()[0] == 0
        assert ax.containers, "error bars"
    counts = [t.get_text() for t in fig.axes[1].texts]
    assert counts == [f"n={r['n']}" for r in rows]
    # A real-VM series gets its own row of panels beside the simulated one.
    real = [study.summarise(2, [{"local_ms": 900.0, "global_ms": 1000.0, "overhead_ms": 100.0},
                                {"local_ms": 950.0, "global_ms": 1040.0, "overhead_ms": 90.0}], "real VMs")]
    assert real[0]["n"] == 2 and real[0]["overhead_ms"] == 95.0
    fig = study.plot(rows, real)
    assert len(fig.axes) == 4 and fig._suptitle is None
    assert "real VMs" in fig.axes[2].get_title() and all(ax.get_ylim()[0] == 0 for ax in fig.axes)


def test_the_real_vm_plot_script_reads_the_measurements_and_writes_a_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    results = REPO / "benches" / "ring_vms" / "results.json"
    assert results.exists(), "benches/ring_vms/measure writes it; it is committed"
    out = tmp_path / "ring_vms.png"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(REPO / "benches" / "ring_vms" / "plot.py"),
         "--results", str(results), "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "4 VMs / 4 PCs" in proc.stdout and "exact True" in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_hypervisor_tour_runs_on_the_in_memory_double() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "python" / "hv_tour.py")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 template(s) expected at the destination" in proc.stdout
    assert proc.stdout.rstrip().endswith("tour done")
