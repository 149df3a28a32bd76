"""Interop with real QEMU processes (harness in qemu.py)."""
