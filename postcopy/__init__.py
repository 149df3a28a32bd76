"""Postcopy live migration speaking QEMU's migration stream."""
