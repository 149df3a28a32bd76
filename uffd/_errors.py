"""Exceptions of the uffd package: one type per concern."""

from __future__ import annotations

import errno as _errno
import os

__all__ = [
    "FeatureNotSupported",
    "MappingChanged",
    "PageAlreadyPresent",
    "UffdClosedError",
    "UffdError",
    "UffdPermissionError",
    "UnknownBlockError",
]


class UffdError(OSError):
    """A userfaultfd operation failed; the message names the ioctl and operands.

    ``errno`` survives (it is an OSError); ``op`` is the ioctl name, ``detail``
    its operands and ``progress`` the bytes done before the failure (COPY,
    ZEROPAGE, CONTINUE and POISON may stop part way).
    """

    def __init__(self, err: int, op: str, detail: str = "", progress: int = 0) -> None:
        super().__init__(err, os.strerror(err))
        self.op = op
        self.detail = detail
        self.progress = progress

    def __str__(self) -> str:
        where = f"{self.op} {self.detail}" if self.detail else self.op
        done = f" (after {self.progress} bytes)" if self.progress else ""
        return f"{where}: {self.strerror}{done}"


class PageAlreadyPresent(UffdError):
    """EEXIST: the destination page is already mapped (an expected race)."""


class MappingChanged(UffdError):
    """EAGAIN: the mapping changed under the ioctl (an expected race; retry or drop)."""


class UffdPermissionError(UffdError):
    """EPERM/EACCES while opening or negotiating; the message says how to fix it."""

    def __init__(self, err: int, op: str, detail: str, how_to_fix: str) -> None:
        super().__init__(err, op, detail)
        self.how_to_fix = how_to_fix

    def __str__(self) -> str:
        return f"{super().__str__()}. {self.how_to_fix}"


class FeatureNotSupported(UffdError):
    """UFFDIO_API: the running kernel lacks a requested feature."""


class UffdClosedError(ValueError):
    """An operation on a closed userfaultfd (like I/O on a closed file)."""


class UnknownBlockError(KeyError):
    """No RAM block has the given idstr."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown RAM block"


def error_for(err: int, op: str, detail: str, progress: int = 0) -> UffdError:
    """The exception type for -errno from an ioctl: benign races get their own."""
    if err == _errno.EEXIST:
        return PageAlreadyPresent(err, op, detail, progress)
    if err == _errno.EAGAIN:
        return MappingChanged(err, op, detail, progress)
    return UffdError(err, op, detail, progress)
