"""unacloud-py/API.md is what scripts/api-docs generates from the installed package."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import unacloud

REPO = Path(__file__).resolve().parents[2]
API = REPO / "unacloud-py" / "API.md"
TOOL = REPO / "unacloud-py" / "tools" / "api_docs.py"


def load_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("api_docs", TOOL)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_committed_api_page_is_up_to_date() -> None:
    generated = load_tool().generate()
    assert API.read_text() == generated, "run scripts/api-docs and commit unacloud-py/API.md"


def test_the_page_documents_every_public_name_with_its_docstring() -> None:
    text = API.read_text()
    for mod in ("vbox", "core", "snapshot", "hv", "provision", "experiment", "errors"):
        assert f"## `unacloud.{mod}`" in text
        for name in getattr(unacloud, mod).__all__:
            assert f"`{name}" in text, f"unacloud.{mod}.{name}"
    assert "### `simulate_ring(nodes: int=4," in text
    assert "- `missing_count: int`: How many files of the set are missing" in text


def test_check_fails_on_a_stale_page(tmp_path: Path) -> None:
    stale = tmp_path / "API.md"
    stale.write_text(API.read_text().replace("simulate_ring", "simulate_rings", 1))
    proc = subprocess.run([sys.executable, str(TOOL), "--check", str(stale)], capture_output=True, text=True)
    assert proc.returncode == 1 and "out of date" in proc.stderr
    ok = subprocess.run([sys.executable, str(TOOL), "--check", str(API)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
