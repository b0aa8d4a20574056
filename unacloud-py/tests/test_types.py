"""The stubs type real use: the examples and the provisioning tests pass `mypy --strict`
(a wrong stub, e.g. `place` typed as returning a dict, fails here)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_examples_and_user_code_pass_mypy_strict(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    user = tmp_path / "user.py"
    user.write_text(
        "from pathlib import Path\n"
        "import unacloud\n"
        "from unacloud import core, provision, snapshot\n"
        "r = snapshot.simulate_ring(nodes=4, tokens=100, local_snapshot_ms=(1.0, 2.0), crash_host=1)\n"
        "total: int = r.tokens_final\n"
        "first: dict[str, object] = r.snapshots()[0]\n"
        "plan = core.place([], [], algorithm='best-fit')\n"
        "host: str | None = plan.host_of('vm')\n"
        "cat = provision.Catalog(Path('catalog.json'))\n"
        "ms = unacloud.vbox.Machine.load(Path('TM.vbox')).migration_set('current')\n"
        "missing: int = ms.missing_count\n"
    )
    bad = tmp_path / "bad.py"
    bad.write_text("from unacloud import core\nn: int = core.place([], []).host_of('vm')\n")
    files = [REPO / "examples" / "python" / "snapshot_study.py", REPO / "examples" / "python" / "hv_tour.py",
             REPO / "unacloud-py" / "tests" / "test_provision.py", user]
    run = [sys.executable, "-m", "mypy", "--strict", "--no-error-summary", "--cache-dir", str(tmp_path / "cache")]
    ok = subprocess.run(run + [str(f) for f in files], capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = subprocess.run(run + [str(bad)], capture_output=True, text=True, timeout=300)
    assert wrong.returncode == 1, wrong.stdout
    assert "Incompatible types in assignment" in wrong.stdout and "None" in wrong.stdout, wrong.stdout
