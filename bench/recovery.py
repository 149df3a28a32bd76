"""Recovery figures: how long a broken link keeps the migration paused.

Two measurements, printed as a table (run as root: it makes network namespaces):

* link outage: source and destination in two network namespaces joined by a
  veth; the link goes down for ``--outage`` seconds mid-postcopy, then up.
  Reported: link down -> both sides paused (detection), and link up ->
  postcopy-active again (the target is <= 200 ms with the default backoff).
* connection reset: the link stays up but both connections are reset (the
  destination breaks them); reported: reset -> postcopy-active again.

    python3 bench/recovery.py [--outages 5] [--outage 1.0] [--resets 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import importlib.util

from postcopy.destination import Destination
from postcopy.owner import BuiltinGuest
from postcopy.guest import Guest, Pattern
from postcopy.source import Source
from postcopy.spec import GuestSpec


def _load_netns():  # type: ignore[no-untyped-def]
    """tests/netns.py by path: putting tests/ on sys.path would let tests/uffd shadow uffd."""
    path = Path(__file__).resolve().parent.parent / "tests" / "netns.py"
    spec = importlib.util.spec_from_file_location("netns", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["netns"] = module
    spec.loader.exec_module(module)
    return module


netns_pair = _load_netns().netns_pair

LINK_TIMEOUT = 1.0


class Clock:
    """Status changes of one role with their monotonic times."""

    def __init__(self) -> None:
        self.events: list[tuple[float, str]] = []
        self.cv = threading.Condition()

    def __call__(self, status: str) -> None:
        with self.cv:
            self.events.append((time.monotonic(), status))
            self.cv.notify_all()

    def wait_for(self, status: str, after: float, timeout: float = 30.0) -> float:
        deadline = time.monotonic() + timeout
        with self.cv:
            while True:
                for t, s in self.events:
                    if s == status and t >= after:
                        return t
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no {status!r} within {timeout} s")
                self.cv.wait(left)


def reconnect_floor(net, outage: float, trials: int = 3) -> list[float]:  # type: ignore[no-untyped-def]
    """Plain TCP: link down for ``outage`` s while a client keeps trying to
    connect (as a recovering source does), then up: time to the first
    successful connect. The kernel's neighbour (ARP) state after failed
    attempts dominates it on a veth."""
    listener = net.socket("b")
    listener.bind((net.addr_b, 0))
    listener.listen(64)
    port = listener.getsockname()[1]

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
                conn.close()
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    out = []
    for _ in range(trials):
        net.link_down("b")
        up_at: list[float] = []

        def client(up_at: list[float] = up_at) -> float:
            while True:
                try:
                    socket.create_connection((net.addr_b, port), timeout=0.25).close()
                    if up_at:
                        return time.monotonic()
                except OSError:
                    time.sleep(0.02)

        box: list[float] = []
        t = threading.Thread(target=lambda box=box: box.append(net.call("a", client)))
        t.start()
        time.sleep(outage)
        up_at.append(time.monotonic())
        net.link_up()
        t.join(30)
        out.append(box[0] - up_at[0])
    listener.close()
    return out


def run(outages: int, outage: float, resets: int) -> dict[str, object]:
    spec = GuestSpec.simple(64 << 20, vcpus=2, pattern="seq", rate_limit=50)
    memory = spec.build_memory()
    guest = Guest(memory, nvcpus=2, pattern=Pattern.SEQ, seed=spec.seed, write_percent=50, rate_limit=50)
    sclock, dclock = Clock(), Clock()
    dest = Destination(BuiltinGuest(spec), preempt=True, on_status=dclock, link_timeout=LINK_TIMEOUT)
    src = Source(BuiltinGuest(spec, memory, guest), preempt=True, bandwidth_cap=2 << 20, on_status=sclock,
                 link_timeout=LINK_TIMEOUT)
    detect, restore, reset_to_active, floor = [], [], [], []
    try:
        guest.fill_initial()
        guest.start()
        with netns_pair() as net:
            floor = reconnect_floor(net, outage)
            listener = net.socket("b")
            listener.bind((net.addr_b, 0))
            listener.listen(4)
            td = net.start_thread("b", dest.serve, listener)
            ts = net.start_thread("a", src.migrate, (net.addr_b, listener.getsockname()[1]))
            sclock.wait_for("postcopy-active", 0)
            time.sleep(0.3)
            for _ in range(outages):
                down = time.monotonic()
                net.link_down("b")
                paused = max(sclock.wait_for("postcopy-paused", down), dclock.wait_for("postcopy-paused", down))
                detect.append(paused - down)
                time.sleep(max(0.0, outage - (time.monotonic() - down)))
                up = time.monotonic()
                net.link_up()
                active = max(sclock.wait_for("postcopy-active", up), dclock.wait_for("postcopy-active", up))
                restore.append(active - up)
                time.sleep(0.2)
            for _ in range(resets):
                t0 = time.monotonic()
                dest.pause()
                active = max(sclock.wait_for("postcopy-active", t0), dclock.wait_for("postcopy-active", t0))
                reset_to_active.append(active - t0)
                time.sleep(0.1)
            src.set_bandwidth_cap(0)     # finish quickly
            ts.join(120)
            td.join(120)
            listener.close()
    finally:
        guest.close()
        dest.close()
        memory.close()

    def stats(xs: list[float]) -> dict[str, float]:
        ms = [x * 1000 for x in xs]
        return {"n": len(ms), "p50_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1)} if ms else {}

    return {
        "link_timeout_s": LINK_TIMEOUT,
        "outage_s": outage,
        "detect": stats(detect),
        "link_up_to_active": stats(restore),
        "floor_link_up_to_tcp_connect": stats(floor),
        "reset_to_active": stats(reset_to_active),
        "source_status": src.result.status,
        "recoveries": src.result.recoveries,
        "paused_s": round(src.result.paused_ns / 1e9, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--outages", type=int, default=5)
    ap.add_argument("--outage", type=float, default=1.0, help="seconds the link stays down")
    ap.add_argument("--resets", type=int, default=10)
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    r = run(args.outages, args.outage, args.resets)
    print(f"recovery bench (link timeout {r['link_timeout_s']} s, outages of {r['outage_s']} s; "
          f"migration {r['source_status']}, {r['recoveries']} recoveries, {r['paused_s']} s paused)")
    print(f"{'measure':34} {'n':>3} {'p50 ms':>8} {'max ms':>8}  target")
    for key, label, target in (("detect", "link down -> both paused", "~link timeout"),
                               ("floor_link_up_to_tcp_connect", "floor: link up -> plain TCP connect", "(same run)"),
                               ("link_up_to_active", "link up -> postcopy-active", "<= 200 ms"),
                               ("reset_to_active", "connections reset -> postcopy-active", "")):
        s = r[key]
        print(f"{label:34} {s.get('n', 0):>3} {s.get('p50_ms', '-'):>8} {s.get('max_ms', '-'):>8}  {target}")  # type: ignore[union-attr]
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0 if r["source_status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
