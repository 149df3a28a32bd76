"""cffi out-of-line API builder for the project's C core (``uffd._native``).

Every component of the C core lives in ``uffd/csrc/`` as three files:

* ``NAME.h``    - what C code and the cffi wrapper see (prototypes, structs);
* ``NAME.c``    - the implementation;
* ``NAME.cdef`` - what Python sees through cffi (may use ``...`` so the compiler
  fills in values and struct layouts).

Adding a component needs no edit here: the three files are found by name. A
.cdef that uses another component's types says so on its first line, e.g.
``// needs: bitmap ramscan``, and is declared after them.
All calls into ``lib`` release the GIL (cffi does so for every C call).
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "uffd" / "csrc"
REL = "uffd/csrc"   # setuptools wants sources relative to setup.py, which sits in ROOT


def _needs(name: str) -> list[str]:
    first = (CSRC / f"{name}.cdef").read_text().split("\n", 1)[0]
    return first.split("needs:", 1)[1].split() if "needs:" in first else []


def _components() -> list[str]:
    """Every component, each after the ones it needs (a depth-first order)."""
    ordered: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in ordered:
            return
        if name in path:
            raise RuntimeError(f"cdef dependency cycle: {' -> '.join((*path, name))}")
        for dep in _needs(name):
            visit(dep, (*path, name))
        ordered.append(name)

    for name in sorted(p.stem for p in CSRC.glob("*.cdef")):
        visit(name, ())
    return ordered


def make_ffibuilder() -> FFI:
    builder = FFI()
    names = _components()
    builder.cdef("\n".join((CSRC / f"{n}.cdef").read_text() for n in names))
    builder.set_source(
        "uffd._native",
        "\n".join(f'#include "{n}.h"' for n in names),
        sources=[f"{REL}/{n}.c" for n in names if (CSRC / f"{n}.c").exists()],
        include_dirs=[REL],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    # Build in place (next to the sources) for development: python uffd/_build.py
    import os

    os.chdir(ROOT)
    ffibuilder.compile(tmpdir=".", verbose=False)
