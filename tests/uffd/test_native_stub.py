"""``uffd/_native.pyi`` (mypy's view of the C core) is generated from the cdefs and current."""

from __future__ import annotations

import ast
from pathlib import Path

from uffd import _native
from uffd._build import make_ffibuilder, make_stub

STUB = Path(__file__).resolve().parents[2] / "uffd" / "_native.pyi"


def test_stub_is_what_the_cdefs_generate() -> None:
    assert STUB.read_text() == make_stub(make_ffibuilder()), (
        "uffd/_native.pyi is stale: run python3 uffd/_build.py --stub"
    )


def test_stub_declares_exactly_the_compiled_lib() -> None:
    tree = ast.parse(STUB.read_text())
    lib_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "_Lib")
    declared = {n.name for n in lib_class.body if isinstance(n, ast.FunctionDef)} | {
        n.target.id
        for n in lib_class.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    assert declared == set(dir(_native.lib))
