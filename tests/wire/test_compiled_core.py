"""The sans-IO core's two builds: mypyc's compiled modules, or their source when asked or stale.

The protocol suites (tests/wire, tests/session) run against whichever build this process
loaded; tests/run.sh runs them a second time with POSTCOPY_PURE_PYTHON=1."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from pathlib import Path

import postcopy
from postcopy._compiled import GROUP_LIBRARY, PURE_PYTHON_ENV, inspect_core

import postcopy.session
import postcopy.wire

ROOT = Path(postcopy.__file__).resolve().parent.parent
EXTENSION = tuple(importlib.machinery.EXTENSION_SUFFIXES)


def _loaded_from(env: dict[str, str]) -> dict[str, object]:
    """A fresh interpreter's verdict and the file each core module came from."""
    code = (
        "import json, sys, postcopy, postcopy.wire, postcopy.session\n"
        "files = {n: m.__file__ for n, m in sys.modules.items()\n"
        "         if n.startswith(('postcopy.wire._', 'postcopy.session._'))}\n"
        "print(json.dumps({'compiled': postcopy.CORE_BUILD.compiled,\n"
        "                  'reason': postcopy.CORE_BUILD.reason, 'files': files}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60)
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_this_process_runs_the_build_it_reports() -> None:
    core = postcopy.CORE_BUILD
    for name, source in core.modules.items():
        module = sys.modules.get(name)
        if module is None:
            continue
        if core.compiled:
            assert str(module.__file__).endswith(EXTENSION), name
        else:
            assert module.__file__ == str(source), name
    if os.environ.get("POSTCOPY_REQUIRE_ALL") == "1" and os.environ.get(PURE_PYTHON_ENV) != "1":
        # CI builds the core: a build that silently fell back would hide from every suite
        assert core.compiled, core.reason
        assert {"postcopy.wire._main", "postcopy.wire._decoder", "postcopy.session._destination",
                "postcopy.session._source"} <= set(core.modules)


def test_pure_python_loads_every_compiled_module_from_its_source() -> None:
    env = dict(os.environ, **{PURE_PYTHON_ENV: "1"})
    seen = _loaded_from(env)
    assert seen["compiled"] is False
    assert seen["reason"] == f"{PURE_PYTHON_ENV}=1" or str(seen["reason"]).startswith("not built")
    files = seen["files"]
    assert isinstance(files, dict)
    assert "postcopy.wire._main" in files
    assert all(str(f).endswith(".py") for f in files.values()), files


def _fake_build(tmp_path: Path, names: list[str]) -> Path:
    """A package laid out as setup.py builds it: each module's source with its (stub) extension
    beside it, and the group's library (the compiled code) made after the sources."""
    package = tmp_path / "pkg"
    for sub in ("wire", "session"):
        (package / sub).mkdir(parents=True)
    for name in names:
        source = package / f"{name}.py"
        source.write_text("x = 1\n")
        (package / f"{name}{EXTENSION[0]}").write_bytes(b"")
        os.utime(source, ns=(1_000_000_000_000, 1_000_000_000_000))
    if names:
        (package / f"{GROUP_LIBRARY}{EXTENSION[0]}").write_bytes(b"")
    return package


def test_a_fresh_build_is_chosen(tmp_path: Path) -> None:
    package = _fake_build(tmp_path, ["wire/_main", "session/_source"])
    (package / "wire" / "_peer.py").write_text("y = 2\n")       # not compiled: not listed
    core = inspect_core(package, checkout=True)
    assert core.compiled
    assert core.reason == ""
    assert set(core.modules) == {"pkg.wire._main", "pkg.session._source"}
    assert core.modules["pkg.wire._main"] == package / "wire" / "_main.py"


def test_a_source_edited_after_its_build_turns_every_module_to_source(tmp_path: Path) -> None:
    package = _fake_build(tmp_path, ["wire/_main", "wire/_decoder", "session/_source"])
    library = package / f"{GROUP_LIBRARY}{EXTENSION[0]}"
    os.utime(library, ns=(2_000_000_000_000, 2_000_000_000_000))
    # the module's own extension is new (an import stub setup.py leaves alone when its C is the
    # same): only the group's library, the code, counts
    os.utime(package / "wire" / f"_decoder{EXTENSION[0]}")
    os.utime(package / "wire" / "_decoder.py", ns=(3_000_000_000_000, 3_000_000_000_000))
    core = inspect_core(package, checkout=True)
    assert not core.compiled
    assert "wire/_decoder.py is newer than its build" in core.reason
    assert len(core.modules) == 3       # all of them: compiled modules call one another directly
    # an installed package's files are not compared (they come together, in any order)
    assert inspect_core(package, checkout=False).compiled


def test_nothing_built_and_pure_python_are_reported(tmp_path: Path) -> None:
    package = _fake_build(tmp_path, [])
    (package / "wire" / "_main.py").write_text("x = 1\n")
    assert inspect_core(package).reason.startswith("not built")
    stubs = _fake_build(tmp_path / "a", ["wire/_main"])
    (stubs / f"{GROUP_LIBRARY}{EXTENSION[0]}").unlink()      # a module's stub without the code
    assert inspect_core(stubs).reason.startswith("not built")
    built = _fake_build(tmp_path / "b", ["wire/_main"])
    core = inspect_core(built, pure=True)
    assert not core.compiled
    assert core.reason == f"{PURE_PYTHON_ENV}=1"
    assert core.describe() == f"interpreted ({PURE_PYTHON_ENV}=1)"
