# What setup.py does: build the C core through cffi (out-of-line API mode) and compile the
# sans-IO protocol core with mypyc. The core's .py files stay the source of truth and the
# fallback: postcopy/_compiled.py loads them instead of a build that is missing or older than
# them, or when POSTCOPY_PURE_PYTHON=1 (set at build time too: nothing is compiled).
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# The codec and the two roles' sessions: every Python step of the switch to postcopy runs here
# (the guest's downtime), and nothing here does IO. Compiled together: a compiled module calls
# the others' functions directly, so they are loaded all compiled or all from source.
SANS_IO_CORE = [
    f"postcopy/{package}/{module}.py"
    for package, modules in {
        "wire": ["_buffer", "_constants", "_decoder", "_encode", "_errors", "_events", "_main",
                 "_preempt", "_ram", "_return_path"],
        "session": ["_destination", "_errors", "_io", "_precopy", "_source", "_stats"],
    }.items()
    for module in modules
]


def compiled_core() -> list[Extension]:
    if os.environ.get("POSTCOPY_PURE_PYTHON") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:     # a build without pyproject.toml's build requirements
        print("setup.py: mypyc not installed: the sans-IO core stays interpreted", file=sys.stderr)
        return []
    return list(mypycify(SANS_IO_CORE, opt_level="3", group_name="postcopy._core"))


class BuildExt(build_ext):
    """build_ext that marks an in-place (or editable) build of the core as made from the sources
    as they are now: mypyc rewrites only C that changed, so an edit that changes no C (a comment)
    would leave the old library behind, older than its source, which postcopy/_compiled.py then
    takes for a stale build."""

    def run(self) -> None:
        super().run()
        if self.inplace or getattr(self, "editable_mode", False):
            here = Path(__file__).resolve().parent
            for ext in self.extensions:
                built = here / self.get_ext_filename(ext.name)
                if ext.name.startswith("postcopy.") and built.exists():
                    os.utime(built)


setup(cffi_modules=["uffd/_build.py:ffibuilder"], ext_modules=compiled_core(), cmdclass={"build_ext": BuildExt})
