"""``Userfaultfd``: owns one userfaultfd and exposes its ioctls."""

from __future__ import annotations

import enum
import errno
import os
from typing import Literal

from ._errors import (
    FeatureNotSupported,
    UffdClosedError,
    UffdError,
    UffdPermissionError,
    error_for,
)
from ._events import UffdEvent, event_from_c
from ._flags import ContinueMode, CopyMode, Feature, Ioctl, RegisterMode, ZeropageMode
from ._lowlevel import check_range_u64, ffi, lib

__all__ = ["Userfaultfd"]

Via = Literal["auto", "syscall", "device"]
# Anything ffi.from_buffer accepts (collections.abc.Buffer is 3.12+).
Buffer = bytes | bytearray | memoryview

NO_FEATURES = Feature(0)

HOW_TO_FIX_EPERM = (
    "To fix it, do one of: "
    "(1) sysctl -w vm.unprivileged_userfaultfd=1; "
    "(2) give this user read/write access to /dev/userfaultfd (e.g. chmod 0666 or a group ACL); "
    "(3) run with CAP_SYS_PTRACE (or as root); "
    "(4) open with user_mode_only=True (UFFD_USER_MODE_ONLY: faults raised by the kernel, "
    "e.g. read() into registered memory, then fail with EFAULT instead of being reported)"
)

# Errors meaning "this way of opening is refused here; try the next one".
_REFUSED = (errno.EPERM, errno.EACCES, errno.ENOSYS, errno.ENOENT, errno.ENODEV)


def flag_names(flags: enum.IntFlag) -> str:
    """ "THREAD_ID|EVENT_REMOVE", with unknown bits in hex; "0" for none."""
    value = int(flags)
    known = [m.name for m in type(flags) if m.value & value and m.name]
    rest = value & ~sum(m.value for m in type(flags))
    parts = known + ([f"0x{rest:x}"] if rest else [])
    return "|".join(parts) or "0"


def _range(start: int, length: int) -> str:
    return f"start=0x{start:x} len={length}"


class Userfaultfd:
    """One userfaultfd, negotiated once with the requested ``features``.

    Opening tries the ``userfaultfd`` syscall and falls back to
    ``/dev/userfaultfd`` (USERFAULTFD_IOC_NEW) when the syscall is refused.
    ``user_mode_only=None`` asks for full (kernel-mode) fault handling first
    and takes UFFD_USER_MODE_ONLY only if that is not permitted; True/False
    force the choice. ``via`` restricts the opening path ("auto" tries both).
    The fd is O_CLOEXEC and, with ``nonblocking`` (default), O_NONBLOCK.

    Memory registered here must never be touched from Python while holding
    the GIL: use C code (``uffd.memtouch``) or another process.
    """

    def __init__(
        self,
        features: Feature = NO_FEATURES,
        *,
        user_mode_only: bool | None = None,
        via: Via = "auto",
        nonblocking: bool = True,
    ) -> None:
        self._fd = -1
        if via not in ("auto", "syscall", "device"):
            raise ValueError(f"via must be 'auto', 'syscall' or 'device', got {via!r}")
        base = os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0)
        choices = [False, True] if user_mode_only is None else [bool(user_mode_only)]
        fd, self.user_mode_only, self.opened_via = self._open(base, choices, via)
        self._fd = fd
        try:
            self.features, self.enabled_features, self.ioctls = self._negotiate(
                Feature(features), base, via
            )
        except BaseException:
            self.close()
            raise

    # -- opening -----------------------------------------------------------

    @staticmethod
    def _open(base: int, choices: list[bool], via: Via) -> tuple[int, bool, str]:
        ways = [w for w in ("syscall", "device") if via in ("auto", w)]
        errors: list[tuple[int, str]] = []
        for umo in choices:
            flags = base | (lib.UFFD_USER_MODE_ONLY if umo else 0)
            for way in ways:
                fn = lib.pc_uffd_open_syscall if way == "syscall" else lib.pc_uffd_open_device
                rc = fn(flags)
                if rc >= 0:
                    return rc, umo, way
                errors.append((-rc, f"{way}(flags=0x{flags:x})"))
                if -rc not in _REFUSED:
                    raise UffdError(-rc, "userfaultfd", f"via {way} flags=0x{flags:x}")
        tried = ", ".join(f"{what}: {os.strerror(err)}" for err, what in errors)
        if any(err in (errno.EPERM, errno.EACCES) for err, _ in errors):
            raise UffdPermissionError(
                errno.EPERM, "userfaultfd", f"open refused [{tried}]", HOW_TO_FIX_EPERM
            )
        raise UffdError(
            errors[-1][0], "userfaultfd", f"open failed [{tried}]; is CONFIG_USERFAULTFD set?"
        )

    def _negotiate(self, requested: Feature, base: int, via: Via) -> tuple[Feature, Feature, Ioctl]:
        # UFFDIO_API works once per fd and a refused request leaves nothing to
        # read, so learn what the kernel supports on a throwaway fd first.
        flags = base | (lib.UFFD_USER_MODE_ONLY if self.user_mode_only else 0)
        probe_fd = (
            lib.pc_uffd_open_syscall if self.opened_via == "syscall" else lib.pc_uffd_open_device
        )(flags)
        if probe_fd < 0:
            raise UffdError(-probe_fd, "userfaultfd", "opening the feature probe")
        feat_out = ffi.new("uint64_t *")
        ioctls_out = ffi.new("uint64_t *")
        try:
            rc = lib.pc_uffd_api(probe_fd, 0, feat_out, ioctls_out)
        finally:
            os.close(probe_fd)
        if rc < 0:
            raise UffdError(-rc, "UFFDIO_API", "features=0x0 (probe)")
        supported = Feature(feat_out[0])
        missing = Feature(int(requested) & ~int(supported))
        if missing:
            raise FeatureNotSupported(
                errno.EINVAL,
                "UFFDIO_API",
                f"features={flag_names(requested)}: kernel {os.uname().release} lacks {flag_names(missing)}",
            )
        rc = lib.pc_uffd_api(self._fd, int(requested), feat_out, ioctls_out)
        if rc == -errno.EPERM:
            raise UffdPermissionError(
                errno.EPERM,
                "UFFDIO_API",
                f"features={flag_names(requested)}",
                "Feature.EVENT_FORK needs CAP_SYS_PTRACE (or root) in the opening process",
            )
        if rc < 0:
            raise UffdError(-rc, "UFFDIO_API", f"features={flag_names(requested)}")
        return supported, requested, Ioctl(ioctls_out[0])

    @classmethod
    def adopt(cls, fd: int, features: Feature = NO_FEATURES) -> Userfaultfd:
        """Own an already negotiated uffd (from a Fork event or another process).

        ``features`` should be what that fd was negotiated with (used only to
        interpret events, e.g. THREAD_ID); nothing is checked with the kernel.
        """
        self = cls.__new__(cls)
        self._fd = fd
        self.user_mode_only = False
        self.opened_via = "adopted"
        self.features = self.enabled_features = Feature(features)
        self.ioctls = Ioctl(0)
        return self

    # -- fd lifecycle --------------------------------------------------------

    def fileno(self) -> int:
        return self._live("fileno")

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> Userfaultfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd={self._fd}"
        return f"<Userfaultfd {state} via={self.opened_via} user_mode_only={self.user_mode_only}>"

    def _live(self, op: str) -> int:
        if self._fd < 0:
            raise UffdClosedError(f"{op} on a closed userfaultfd")
        return self._fd

    # -- ranges --------------------------------------------------------------

    def register(self, addr: int, length: int, mode: RegisterMode) -> Ioctl:
        """UFFDIO_REGISTER; returns the ioctls the kernel allows on the range."""
        fd = self._live("UFFDIO_REGISTER")
        check_range_u64("UFFDIO_REGISTER", addr=addr, length=length, mode=int(mode))
        out = ffi.new("uint64_t *")
        rc = lib.pc_uffd_register(fd, addr, length, int(mode), out)
        if rc < 0:
            raise error_for(
                -rc,
                "UFFDIO_REGISTER",
                f"{_range(addr, length)} mode={flag_names(RegisterMode(mode))}",
            )
        return Ioctl(out[0])

    def unregister(self, addr: int, length: int) -> None:
        fd = self._live("UFFDIO_UNREGISTER")
        check_range_u64("UFFDIO_UNREGISTER", addr=addr, length=length)
        rc = lib.pc_uffd_unregister(fd, addr, length)
        if rc < 0:
            raise error_for(-rc, "UFFDIO_UNREGISTER", _range(addr, length))

    def copy(self, dst: int, src: int | Buffer, length: int, mode: CopyMode | int = 0) -> int:
        """UFFDIO_COPY ``length`` bytes from ``src`` (address or buffer); wakes unless DONTWAKE.

        Returns the bytes copied. EEXIST raises PageAlreadyPresent and EAGAIN
        MappingChanged, with ``progress`` = bytes placed before the stop.
        """
        fd = self._live("UFFDIO_COPY")
        keep = None
        if isinstance(src, int):
            src_addr = src
        else:
            keep = ffi.from_buffer(src)
            if len(keep) < length:
                raise ValueError(
                    f"UFFDIO_COPY: source buffer has {len(keep)} bytes, fewer than len={length}"
                )
            src_addr = int(ffi.cast("uintptr_t", keep))
        check_range_u64("UFFDIO_COPY", dst=dst, src=src_addr, length=length, mode=int(mode))
        out = ffi.new("int64_t *")
        rc = lib.pc_uffd_copy(fd, dst, src_addr, length, int(mode), out)
        del keep
        if rc < 0:
            raise error_for(
                -rc,
                "UFFDIO_COPY",
                f"dst=0x{dst:x} src=0x{src_addr:x} len={length} mode={int(mode)}",
                out[0],
            )
        return int(out[0])

    def zeropage(self, dst: int, length: int, mode: ZeropageMode | int = 0) -> int:
        """UFFDIO_ZEROPAGE; returns the bytes mapped."""
        fd = self._live("UFFDIO_ZEROPAGE")
        check_range_u64("UFFDIO_ZEROPAGE", dst=dst, length=length, mode=int(mode))
        out = ffi.new("int64_t *")
        rc = lib.pc_uffd_zeropage(fd, dst, length, int(mode), out)
        if rc < 0:
            raise error_for(
                -rc, "UFFDIO_ZEROPAGE", f"dst=0x{dst:x} len={length} mode={int(mode)}", out[0]
            )
        return int(out[0])

    def wake(self, addr: int, length: int) -> None:
        fd = self._live("UFFDIO_WAKE")
        check_range_u64("UFFDIO_WAKE", addr=addr, length=length)
        rc = lib.pc_uffd_wake(fd, addr, length)
        if rc < 0:
            raise error_for(-rc, "UFFDIO_WAKE", _range(addr, length))

    def writeprotect(self, addr: int, length: int, protect: bool, dontwake: bool = False) -> None:
        """UFFDIO_WRITEPROTECT: set (protect=True) or clear write protection."""
        fd = self._live("UFFDIO_WRITEPROTECT")
        check_range_u64("UFFDIO_WRITEPROTECT", addr=addr, length=length)
        mode = (lib.UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | (
            lib.UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0
        )
        rc = lib.pc_uffd_writeprotect(fd, addr, length, mode)
        if rc < 0:
            raise error_for(
                -rc,
                "UFFDIO_WRITEPROTECT",
                f"{_range(addr, length)} protect={protect} dontwake={dontwake}",
            )

    def continue_(self, addr: int, length: int, mode: ContinueMode | int = 0) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages of a MINOR-registered range."""
        fd = self._live("UFFDIO_CONTINUE")
        check_range_u64("UFFDIO_CONTINUE", addr=addr, length=length, mode=int(mode))
        out = ffi.new("int64_t *")
        rc = lib.pc_uffd_continue(fd, addr, length, int(mode), out)
        if rc < 0:
            raise error_for(
                -rc, "UFFDIO_CONTINUE", f"{_range(addr, length)} mode={int(mode)}", out[0]
            )
        return int(out[0])

    def poison(self, addr: int, length: int) -> int:
        """UFFDIO_POISON: later accesses to the range get SIGBUS."""
        fd = self._live("UFFDIO_POISON")
        check_range_u64("UFFDIO_POISON", addr=addr, length=length)
        out = ffi.new("int64_t *")
        rc = lib.pc_uffd_poison(fd, addr, length, 0, out)
        if rc < 0:
            raise error_for(-rc, "UFFDIO_POISON", _range(addr, length), out[0])
        return int(out[0])

    # -- events --------------------------------------------------------------

    def read_events(self, max_events: int = 64) -> list[UffdEvent]:
        """Read pending events in batches; [] when nothing is pending.

        Pagefaults come back as PageFault; the fast path for faults is
        ``FaultReader`` (no Python object per fault). With ``nonblocking=False``
        the first read blocks until an event arrives.
        """
        fd = self._live("read")
        if max_events <= 0:
            raise ValueError(f"read_events: max_events must be positive, got {max_events}")
        thread_id = Feature.THREAD_ID in self.enabled_features
        chunk = min(max_events, 64)
        buf = ffi.new("pc_uffd_event[]", chunk)
        events: list[UffdEvent] = []
        while len(events) < max_events:
            want = min(chunk, max_events - len(events))
            n = lib.pc_uffd_read_events(fd, buf, want)
            if n == -errno.EAGAIN:
                break
            if n < 0:
                raise UffdError(-n, "read", f"userfaultfd fd={fd} max_events={want}")
            events.extend(event_from_c(buf[i], thread_id) for i in range(n))
            if n < want:
                break
        return events
