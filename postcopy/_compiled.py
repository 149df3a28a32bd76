"""Which build of the sans-IO core runs: mypyc's compiled modules or their Python source.

setup.py compiles the codec (``postcopy.wire``) and the sessions (``postcopy.session``) with
mypyc: every Python step of the switch to postcopy, the guest's downtime, runs there (the
destination's share of the switch in 150 against 245 us, warm). The .py files stay the source
of truth. Python's import system prefers an extension module to the .py beside it, so in a
source checkout (built in place) an edit would be shadowed by its older build without a word.
:func:`select_core` runs at ``postcopy``'s import, before any of these modules, and puts a
finder first that loads every compiled module's source instead when

* ``POSTCOPY_PURE_PYTHON=1`` (the tests run the sans-IO suites both ways), or
* in a source checkout, any of them is newer than its build: all of them then, because a
  compiled module calls the others' compiled functions directly.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

__all__ = ["PURE_PYTHON_ENV", "CoreBuild", "inspect_core", "select_core"]

log = logging.getLogger("postcopy")

PURE_PYTHON_ENV = "POSTCOPY_PURE_PYTHON"
#: the library of setup.py's mypyc group ("postcopy._core"), beside the package's modules
GROUP_LIBRARY = "_core__mypyc"
_PACKAGE_DIR = Path(__file__).resolve().parent
_CORE_PACKAGES = ("wire", "session")


@dataclass(frozen=True)
class CoreBuild:
    """What :func:`inspect_core` found: ``modules``, each compiled module's name and source;
    ``compiled``: their builds are the ones to load; otherwise ``reason`` says why not."""

    modules: dict[str, Path]
    compiled: bool
    reason: str = ""

    def describe(self) -> str:
        if self.compiled:
            return f"compiled (mypyc, {len(self.modules)} modules)"
        return f"interpreted ({self.reason})"


def _extension(stem: Path) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        built = stem.with_name(stem.name + suffix)
        if built.exists():
            return built
    return None


def inspect_core(package_dir: Path = _PACKAGE_DIR, *, pure: bool = False,
                 checkout: bool | None = None) -> CoreBuild:
    """The compiled modules under ``package_dir`` and whether to load them. ``checkout``: a
    source tree built in place (default: a setup.py beside the package), where an edit can make
    a build stale; an installed package's files come together and are not compared."""
    package = package_dir.name
    modules = {
        f"{package}.{sub}.{source.stem}": source
        for sub in _CORE_PACKAGES
        for source in sorted((package_dir / sub).glob("*.py"))
        if _extension(source.with_suffix("")) is not None
    }
    # the group's library holds the compiled code; each module's own extension only imports it
    library = _extension(package_dir / GROUP_LIBRARY)
    if not modules or library is None:
        return CoreBuild(modules, False, "not built: no compiled module beside the sources")
    if pure:
        return CoreBuild(modules, False, f"{PURE_PYTHON_ENV}=1")
    if checkout is None:
        checkout = (package_dir.parent / "setup.py").exists()
    if checkout:
        built_ns = library.stat().st_mtime_ns
        for source in modules.values():
            if source.stat().st_mtime_ns > built_ns:
                where = source.relative_to(package_dir.parent)
                return CoreBuild(modules, False, f"{where} is newer than its build; rebuild with "
                                 "`python3 setup.py build_ext --inplace` or `pip install -e .`")
    return CoreBuild(modules, True)


class _SourceFinder(importlib.abc.MetaPathFinder):
    """Finds the listed modules' .py files ahead of the path finder (which would take the
    extension module beside each)."""

    def __init__(self, modules: dict[str, Path]) -> None:
        self.modules = modules

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        source = self.modules.get(fullname)
        return None if source is None else importlib.util.spec_from_file_location(fullname, source)


def select_core() -> CoreBuild:
    """Decide once, before the core is imported; with the sources chosen over a build, put the
    finder that loads them first on ``sys.meta_path``."""
    core = inspect_core(pure=os.environ.get(PURE_PYTHON_ENV) == "1")
    if not core.compiled and core.modules:
        sys.meta_path.insert(0, _SourceFinder(core.modules))
        if not core.reason.startswith(PURE_PYTHON_ENV):
            log.warning("postcopy: the sans-IO core runs interpreted: %s", core.reason)
    return core
