"""The type stubs name exactly what the extension exports, and the package re-exports it.

`scripts/test-python` also runs `python -m mypy.stubtest unacloud._native`, which checks
every signature against the runtime."""

from __future__ import annotations

import ast
from pathlib import Path

import unacloud
import unacloud._native as native

STUB = Path(unacloud.__file__).with_name("_native.pyi")


def public(name: str) -> bool:
    return not name.startswith("_") or name == "__version__"


def stub_names() -> set[str]:
    tree = ast.parse(STUB.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if public(n)}


def test_every_stubbed_name_exists_and_every_export_is_stubbed() -> None:
    exported = {n for n in dir(native) if public(n)}
    assert stub_names() == exported


def test_stubbed_methods_exist() -> None:
    tree = ast.parse(STUB.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            cls = getattr(native, node.name)
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name != "__init__":
                    assert hasattr(cls, item.name), f"{node.name}.{item.name}"


def test_public_modules_reexport() -> None:
    for mod in (unacloud.vbox, unacloud.core, unacloud.snapshot, unacloud.hv, unacloud.experiment):
        for name in mod.__all__:
            assert getattr(mod, name) is getattr(native, name)
    assert (Path(unacloud.__file__).parent / "py.typed").exists()
    assert issubclass(unacloud.ParseError, ValueError) and issubclass(unacloud.ParseError, unacloud.UnacloudError)
