"""The examples in the modules' docstrings (which API.md shows) run and print what they
say."""

from __future__ import annotations

import doctest

import pytest

import unacloud


@pytest.mark.parametrize("name", ["core", "snapshot", "hv", "provision", "vbox", "experiment", "errors"])
def test_module_examples(name: str) -> None:
    result = doctest.testmod(getattr(unacloud, name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
