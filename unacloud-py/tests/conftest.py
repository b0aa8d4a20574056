"""Shared fixtures: where the real VirtualBox files are."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def vbox_fixtures() -> list[Path]:
    files = sorted((FIXTURES / "vbox").glob("*.vbox*"))
    if not files:
        pytest.skip(f"no VirtualBox fixtures at {FIXTURES / 'vbox'}")
    return files


@pytest.fixture(scope="session")
def kali(vbox_fixtures: list[Path]) -> Path:
    return next(p for p in vbox_fixtures if "kali-linux" in p.name)
