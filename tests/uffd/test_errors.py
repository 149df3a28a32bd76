"""Bad input and refused operations: clear exceptions naming the operands, no crash."""

from __future__ import annotations

import errno
import fcntl
import os
import pickle
from collections.abc import Callable

import pytest

from uffd import (
    Feature,
    FeatureNotSupported,
    Ioctl,
    MappingChanged,
    RamBlock,
    RegisterMode,
    UffdClosedError,
    UffdError,
    UffdPermissionError,
    Userfaultfd,
)

PAGE = 4096


def test_negotiation_exposes_features_and_ioctls(uffd: Userfaultfd) -> None:
    assert Feature.MISSING_SHMEM in uffd.features
    assert Feature.THREAD_ID in uffd.enabled_features
    assert Feature.EVENT_REMOVE not in uffd.enabled_features
    assert {Ioctl.API, Ioctl.REGISTER, Ioctl.UNREGISTER} <= set(Ioctl(uffd.ioctls))


def test_unsupported_feature_is_named() -> None:
    bogus = Feature(1 << 40)  # not a kernel feature
    with pytest.raises(FeatureNotSupported, match=r"UFFDIO_API features=.*lacks") as info:
        Userfaultfd(Feature.THREAD_ID | bogus, user_mode_only=True)
    assert info.value.errno == errno.EINVAL


def test_closed_fd_operations_raise_value_error(make_block: Callable[..., RamBlock]) -> None:
    u = Userfaultfd(user_mode_only=True)
    fd = u.fileno()
    with u:
        assert not u.closed
    assert u.closed
    u.close()  # idempotent
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # really closed
    b = make_block("pc.ram", PAGE)
    calls = {
        "UFFDIO_REGISTER": lambda: u.register(b.addr, PAGE, RegisterMode.MISSING),
        "UFFDIO_UNREGISTER": lambda: u.unregister(b.addr, PAGE),
        "UFFDIO_COPY": lambda: u.copy(b.addr, bytes(PAGE), PAGE),
        "UFFDIO_ZEROPAGE": lambda: u.zeropage(b.addr, PAGE),
        "UFFDIO_WAKE": lambda: u.wake(b.addr, PAGE),
        "UFFDIO_WRITEPROTECT": lambda: u.writeprotect(b.addr, PAGE, True),
        "UFFDIO_CONTINUE": lambda: u.continue_(b.addr, PAGE),
        "UFFDIO_POISON": lambda: u.poison(b.addr, PAGE),
        "read": lambda: u.read_events(),
        "fileno": lambda: u.fileno(),
    }
    for op, call in calls.items():
        with pytest.raises(UffdClosedError, match=f"{op} on a closed userfaultfd"):
            call()
    assert issubclass(UffdClosedError, ValueError)


def test_misaligned_register_names_operands(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock]
) -> None:
    b = make_block("pc.ram", 4 * PAGE)
    with pytest.raises(
        UffdError,
        match=rf"UFFDIO_REGISTER start=0x{b.addr + 1:x} len=4096 mode=.*MISSING.*: Invalid argument",
    ) as info:
        uffd.register(b.addr + 1, PAGE, RegisterMode.MISSING)
    assert info.value.errno == errno.EINVAL
    with pytest.raises(UffdError, match="len=100"):
        uffd.register(b.addr, 100, RegisterMode.MISSING)


def test_misaligned_and_unregistered_copy(
    uffd: Userfaultfd, make_block: Callable[..., RamBlock]
) -> None:
    b = make_block("pc.ram", 4 * PAGE)
    uffd.register(b.addr, b.used_length, RegisterMode.MISSING)
    with pytest.raises(UffdError, match=rf"UFFDIO_COPY dst=0x{b.addr + 8:x} .*: Invalid argument"):
        uffd.copy(b.addr + 8, bytes(PAGE), PAGE)
    other = make_block("other", 4 * PAGE)  # never registered
    with pytest.raises(UffdError, match=rf"UFFDIO_COPY dst=0x{other.addr:x}.*No such file") as info:
        uffd.copy(other.addr, bytes(PAGE), PAGE)
    assert info.value.errno == errno.ENOENT
    with pytest.raises(ValueError, match="source buffer has 10 bytes, fewer than len=4096"):
        uffd.copy(b.addr, bytes(10), PAGE)
    with pytest.raises(ValueError, match=r"UFFDIO_COPY: dst=-4096 is outside 0..2\*\*64-1"):
        uffd.copy(-PAGE, bytes(PAGE), PAGE)
    with pytest.raises(TypeError, match="length must be an int"):
        uffd.zeropage(b.addr, 4096.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_events must be positive"):
        uffd.read_events(0)


def test_double_registration(
    make_uffd: Callable[..., Userfaultfd], make_block: Callable[..., RamBlock]
) -> None:
    """The kernel accepts registering a range again on the same uffd (no-op) and
    refuses it from a second uffd with EBUSY; overlapping ranges behave alike."""
    u1 = make_uffd(user_mode_only=True)
    u2 = make_uffd(user_mode_only=True)
    b = make_block("pc.ram", 4 * PAGE)
    first = u1.register(b.addr, b.used_length, RegisterMode.MISSING)
    assert u1.register(b.addr, b.used_length, RegisterMode.MISSING) == first
    with pytest.raises(
        UffdError,
        match=rf"UFFDIO_REGISTER start=0x{b.addr + PAGE:x} len=4096.*Device or resource busy",
    ) as info:
        u2.register(b.addr + PAGE, PAGE, RegisterMode.MISSING)
    assert info.value.errno == errno.EBUSY
    u1.unregister(b.addr, b.used_length)
    u2.register(b.addr, b.used_length, RegisterMode.MISSING)  # free again


def test_error_types_are_oserrors_with_errno() -> None:
    e = MappingChanged(errno.EAGAIN, "UFFDIO_COPY", "dst=0x1000 src=0x2000 len=4096 mode=0")
    assert isinstance(e, UffdError)
    assert isinstance(e, OSError)
    assert e.errno == errno.EAGAIN
    assert (
        str(e)
        == "UFFDIO_COPY dst=0x1000 src=0x2000 len=4096 mode=0: Resource temporarily unavailable"
    )
    assert pickle.loads(pickle.dumps(e)).errno == errno.EAGAIN


def _in_unprivileged_child(fn: Callable[[], str]) -> str:
    """Run fn as uid/gid 65534 (no capabilities) in a forked child; return its text."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: touches no registered memory, only opens fds
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            out = fn()
        except BaseException as e:  # report anything to the parent
            out = f"unexpected {type(e).__name__}: {e}"
        os.write(w, out.encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        text = f.read().decode()
    os.waitpid(pid, 0)
    return text


def _read_sysctl() -> str:
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        return f.read().strip()


@pytest.mark.root
def test_unprivileged_open_falls_back_to_user_mode_only() -> None:
    if _read_sysctl() != "0" or os.stat("/dev/userfaultfd").st_mode & 0o006:
        pytest.fail(
            "this test needs vm.unprivileged_userfaultfd=0 and a root-only /dev/userfaultfd"
        )

    def auto() -> str:
        with Userfaultfd() as u:
            return f"{u.user_mode_only} {u.opened_via}"

    assert _in_unprivileged_child(auto) == "True syscall"


@pytest.mark.root
def test_unprivileged_eperm_explains_how_to_fix() -> None:
    if _read_sysctl() != "0" or os.stat("/dev/userfaultfd").st_mode & 0o006:
        pytest.fail(
            "this test needs vm.unprivileged_userfaultfd=0 and a root-only /dev/userfaultfd"
        )

    def forced_kernel_mode() -> str:
        try:
            Userfaultfd(user_mode_only=False)
        except UffdPermissionError as e:
            return f"{e.errno}|{e}"
        return "opened"

    text = _in_unprivileged_child(forced_kernel_mode)
    err, message = text.split("|", 1)
    assert int(err) == errno.EPERM
    for needle in (
        "vm.unprivileged_userfaultfd=1",
        "/dev/userfaultfd",
        "CAP_SYS_PTRACE",
        "user_mode_only=True",
    ):
        assert needle in message

    def fork_events() -> str:
        try:
            Userfaultfd(Feature.EVENT_FORK)
        except UffdPermissionError as e:
            return str(e)
        return "negotiated"

    assert "EVENT_FORK needs CAP_SYS_PTRACE" in _in_unprivileged_child(fork_events)


def test_open_flags_are_cloexec_and_nonblocking() -> None:
    with Userfaultfd(user_mode_only=True) as u:
        assert fcntl.fcntl(u.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(u.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert u.read_events() == []  # non-blocking: nothing pending is not an error
    with Userfaultfd(user_mode_only=True, nonblocking=False) as u:
        assert not fcntl.fcntl(u.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    with pytest.raises(ValueError, match="via must be 'auto', 'syscall' or 'device', got 'ioctl'"):
        Userfaultfd(via="ioctl")  # type: ignore[arg-type]
