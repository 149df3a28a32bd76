"""Errors a QMP command reports to its client, with QEMU's error classes."""

from __future__ import annotations

from typing import ClassVar

__all__ = ["CommandNotFound", "QMPError"]


class QMPError(Exception):
    """A command failed; the client gets ``{"error": {"class": error_class, "desc": desc}}``.

    Raise it (not another exception) from a MigrationControl method to report a
    refusal; the message should name what was wrong, as QEMU's do.
    """

    error_class: ClassVar[str] = "GenericError"

    def __init__(self, desc: str) -> None:
        super().__init__(desc)
        self.desc = desc


class CommandNotFound(QMPError):
    """The command does not exist in the current mode (QEMU's CommandNotFound)."""

    error_class: ClassVar[str] = "CommandNotFound"
