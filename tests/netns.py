"""Two network namespaces joined by a veth pair: a real link that tests can take down.

Used by tests marked ``root``. Each pair gets fresh namespace and interface
names and private addresses (10.200.N.1/30 and .2) that exist only inside the
namespaces it creates, so nothing is routed anywhere and concurrent runs do not
collide. Everything is removed on exit, also when the test fails::

    with netns_pair() as net:
        server = net.socket("b"); server.bind((net.addr_b, 0)); ...
        net.link_down()   # the b end goes down: a sees a silent peer (timeouts)
        net.link_up()

Ways to run code inside a namespace: :meth:`NetnsPair.call` runs a Python
callable in a fresh thread that has joined it (sockets made there stay in that
namespace whichever thread uses them later); :meth:`NetnsPair.run` and
:meth:`NetnsPair.popen` run a subprocess with ``ip netns exec``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ["NetnsError", "NetnsPair", "ip_command", "netns_pair"]

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"
IP_TIMEOUT_SECONDS = 10.0


class NetnsError(RuntimeError):
    """Setting up, using or removing a test namespace failed; the message names the command."""


def ip_command() -> str:
    """Path of iproute2's ``ip``; NetnsError naming the package when it is missing."""
    path = shutil.which("ip") or next(
        (p for p in ("/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip") if os.access(p, os.X_OK)), None
    )
    if path is None:
        raise NetnsError(
            "`ip` not found: apt-get install iproute2 (tests/run.sh does this as root)"
        )
    return path


def _ip(*args: str) -> None:
    argv = [ip_command(), *args]
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=IP_TIMEOUT_SECONDS, check=False
        )
    except subprocess.TimeoutExpired:
        raise NetnsError(
            f"`{' '.join(argv)}` did not finish within {IP_TIMEOUT_SECONDS} s"
        ) from None
    if proc.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed ({proc.returncode}): {proc.stderr.strip()}")


_libc = ctypes.CDLL(None, use_errno=True)


def _enter_netns(name: str) -> None:
    """Move the calling thread (only) into the named network namespace."""
    fd = os.open(os.path.join(NETNS_RUN_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise NetnsError(f"setns({name}, CLONE_NEWNET): {os.strerror(err)}")
    finally:
        os.close(fd)


@dataclass
class NetnsPair:
    """Namespaces ``a`` and ``b`` (their real names in .ns_a/.ns_b) joined by veth_a <-> veth_b."""

    ns_a: str
    ns_b: str
    veth_a: str
    veth_b: str
    addr_a: str
    addr_b: str
    prefix_len: int = 30
    _procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    def ns(self, which: str) -> str:
        """The real namespace name for "a" or "b" (or a real name, passed through)."""
        if which == "a":
            return self.ns_a
        if which == "b":
            return self.ns_b
        if which in (self.ns_a, self.ns_b):
            return which
        raise NetnsError(
            f"unknown namespace {which!r}: use 'a', 'b', {self.ns_a!r} or {self.ns_b!r}"
        )

    def _veths(self, end: str) -> list[tuple[str, str]]:
        ends = {"a": [(self.ns_a, self.veth_a)], "b": [(self.ns_b, self.veth_b)]}
        ends["both"] = ends["a"] + ends["b"]
        if end not in ends:
            raise NetnsError(f"unknown link end {end!r}: use 'a', 'b' or 'both'")
        return ends[end]

    def link_down(self, end: str = "b") -> None:
        """``ip link set down`` on one end (default b) or both.

        The end that goes down loses its routes (its own sends fail with
        ENETUNREACH at once); the other end only loses carrier, so its packets
        vanish and its connects and sends time out, as over a cut cable.
        """
        for ns, veth in self._veths(end):
            _ip("-n", ns, "link", "set", veth, "down")

    def link_up(self, end: str = "both") -> None:
        """``ip link set up`` (default: both ends); addresses and routes come back."""
        for ns, veth in self._veths(end):
            _ip("-n", ns, "link", "set", veth, "up")

    def call(
        self, which: str, fn: Callable[..., T], *args: Any, timeout_seconds: float = 30.0
    ) -> T:
        """Run ``fn(*args)`` in a fresh thread inside namespace ``which``; return or raise its result."""
        name = self.ns(which)
        result: list[T] = []
        error: list[BaseException] = []

        def target() -> None:
            try:
                _enter_netns(name)
                result.append(fn(*args))
            except BaseException as exc:  # handed to the caller's thread
                error.append(exc)

        thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
        thread.start()
        thread.join(timeout_seconds)
        if thread.is_alive():
            raise NetnsError(
                f"callable {fn!r} in namespace {name} still running after {timeout_seconds} s"
            )
        if error:
            raise error[0]
        return result[0]

    def start_thread(self, which: str, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        """Start a daemon thread running ``fn(*args)`` inside namespace ``which`` (e.g. a server loop)."""
        name = self.ns(which)

        def target() -> None:
            _enter_netns(name)
            fn(*args)

        thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
        thread.start()
        return thread

    def socket(self, which: str, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
        """A new IPv4 socket that lives in namespace ``which``."""
        return self.call(which, socket.socket, socket.AF_INET, kind)

    def exec_argv(self, which: str, argv: Sequence[str]) -> list[str]:
        return [ip_command(), "netns", "exec", self.ns(which), *argv]

    def run(
        self,
        which: str,
        argv: Sequence[str],
        *,
        timeout_seconds: float = 60.0,
        check: bool = True,
        **kwargs: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """Run a subprocess inside the namespace (``ip netns exec``), bounded in time."""
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        return subprocess.run(
            self.exec_argv(which, argv), timeout=timeout_seconds, check=check, **kwargs
        )

    def popen(self, which: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a subprocess inside the namespace; it is killed when the pair is removed."""
        proc = subprocess.Popen(self.exec_argv(which, argv), **kwargs)
        self._procs.append(proc)
        return proc

    def close(self) -> None:
        """Kill the subprocesses started here and delete both namespaces (and so the veth pair)."""
        errors: list[str] = []
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self._procs.clear()
        for ns in (self.ns_a, self.ns_b):
            if os.path.exists(os.path.join(NETNS_RUN_DIR, ns)):
                try:
                    _ip("netns", "del", ns)
                except NetnsError as exc:
                    errors.append(str(exc))
        if errors:
            raise NetnsError("; ".join(errors))


@contextlib.contextmanager
def netns_pair(subnet: int = 0) -> Iterator[NetnsPair]:
    """Create two namespaces joined by a veth pair with 10.200.<subnet>.1/30 and .2; always cleaned up."""
    if not 0 <= subnet <= 255:
        raise NetnsError(f"subnet must be 0..255 (10.200.<subnet>.0/30), got {subnet}")
    tag = secrets.token_hex(3)  # unique names: other runs may hold namespaces at the same time
    pair = NetnsPair(
        ns_a=f"pcfp-{tag}-a",
        ns_b=f"pcfp-{tag}-b",
        veth_a=f"pcv{tag}a",
        veth_b=f"pcv{tag}b",  # <= 15 characters (IFNAMSIZ)
        addr_a=f"10.200.{subnet}.1",
        addr_b=f"10.200.{subnet}.2",
    )
    try:
        for ns in (pair.ns_a, pair.ns_b):
            _ip("netns", "add", ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip(
            "link",
            "add",
            pair.veth_a,
            "netns",
            pair.ns_a,
            "type",
            "veth",
            "peer",
            "name",
            pair.veth_b,
            "netns",
            pair.ns_b,
        )
        for ns, veth, addr in (
            (pair.ns_a, pair.veth_a, pair.addr_a),
            (pair.ns_b, pair.veth_b, pair.addr_b),
        ):
            _ip("-n", ns, "addr", "add", f"{addr}/{pair.prefix_len}", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
        yield pair
    finally:
        pair.close()
