"""cffi out-of-line API builder for the project's C core (``uffd._native``).

Every component of the C core lives in ``uffd/csrc/`` as three files:

* ``NAME.h``    - what C code and the cffi wrapper see (prototypes, structs);
* ``NAME.c``    - the implementation;
* ``NAME.cdef`` - what Python sees through cffi (may use ``...`` so the compiler
  fills in values and struct layouts).

Adding a component needs no edit here: the three files are found by name.
All calls into ``lib`` release the GIL (cffi does so for every C call).
"""

from __future__ import annotations

from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent / "csrc"


def _components() -> list[str]:
    return sorted(p.stem for p in CSRC.glob("*.cdef"))


def make_ffibuilder() -> FFI:
    builder = FFI()
    names = _components()
    builder.cdef("\n".join((CSRC / f"{n}.cdef").read_text() for n in names))
    builder.set_source(
        "uffd._native",
        "\n".join(f'#include "{n}.h"' for n in names),
        sources=[str(CSRC / f"{n}.c") for n in names if (CSRC / f"{n}.c").exists()],
        include_dirs=[str(CSRC)],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        libraries=["pthread"],
    )
    return builder


ffibuilder = make_ffibuilder()

if __name__ == "__main__":
    # Build in place (next to the sources) for development: python uffd/_build.py
    ffibuilder.compile(tmpdir=str(CSRC.parent.parent), verbose=False)
