"""Postcopy live migration speaking QEMU's migration stream."""

from ._compiled import select_core

#: the sans-IO core's build in this process: mypyc-compiled, or its Python source and why
CORE_BUILD = select_core()
