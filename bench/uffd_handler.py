"""``postcopy uffd-handler`` against a plain C handler (Firecracker's on-demand
example: mmap the file, UFFDIO_COPY each faulting page), in the same run.

A VMM stand-in (tests/handler/vmm.c) registers a 1 GiB guest in two regions,
hands its uffd over, then reads every 4 KiB page once in a scattered order,
optionally "computing" between reads (--think-ns). It times each read of a
page that was not resident (mincore) as one fault: p50 / p99. Fully resident:
the plain handler when it has served every page (every page faulted), ours
when its record says every page is placed (report time_to_resident_seconds).

Targets: p50 within 1.2x of the plain handler; fully resident >= 2x sooner.

``--live`` adds a row for live mode: ``uffd-handler --listen`` fed by
``postcopy source --mem-file`` over localhost TCP (preempt on); a fault there
is a page request answered by the source, and "resident" is the source's
migration time (connected -> completed: every page placed), so the source's
start (reading the file) is not counted.

Usage: python3 bench/uffd_handler.py [--size-mib 1024] [--think-ns 2000] [--live]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def build(tmp: Path) -> tuple[Path, Path]:
    vmm, plain = tmp / "vmm", tmp / "plain"
    subprocess.run(["cc", "-O2", "-pthread", "-o", str(vmm), str(ROOT / "tests/handler/vmm.c")], check=True)
    subprocess.run(["cc", "-O2", "-o", str(plain), str(ROOT / "bench/plain_uffd_handler.c")], check=True)
    return vmm, plain


def memory_file(path: Path, size: int) -> None:
    block = os.urandom(MiB)
    with path.open("wb") as f:
        for i in range(size // MiB):
            f.write(i.to_bytes(8, "little") + block[8:])


def result(out: str) -> dict[str, str]:
    line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
    return dict(kv.split("=", 1) for kv in line.split()[1:])


def vmm_args(vmm: Path, sock: Path, mem: Path, size: int, think_ns: int) -> list[str]:
    first = size * 3 // 4
    return [str(vmm), str(sock), str(mem), "--regions", f"{first},{size - first}", "--measure",
            "--think-ns", str(think_ns)]


def run_plain(plain: Path, vmm: Path, mem: Path, tmp: Path, size: int, think_ns: int) -> dict[str, float]:
    sock = tmp / "plain.sock"
    h = subprocess.Popen([str(plain), str(sock), str(mem)], stdout=subprocess.PIPE, text=True)
    assert h.stdout is not None
    assert h.stdout.readline().strip() == "LISTENING"
    res = result(subprocess.run(vmm_args(vmm, sock, mem, size, think_ns), capture_output=True, text=True,
                                check=True).stdout)
    out, _ = h.communicate(timeout=60)
    resident = next(float(ln.split("=")[1]) for ln in out.splitlines() if ln.startswith("RESIDENT"))
    assert res["ok"] == "1", res
    return {"p50_us": float(res["p50_us"]), "p99_us": float(res["p99_us"]), "faults": float(res["faults"]),
            "resident_s": resident, "touch_s": float(res["touch_seconds"])}


def run_ours(vmm: Path, mem: Path, tmp: Path, size: int, think_ns: int, fill: bool) -> dict[str, float]:
    sock, report = tmp / "ours.sock", tmp / "ours.json"
    h = subprocess.Popen([sys.executable, "-m", "postcopy", "uffd-handler", "--socket", str(sock), "--mem-file", str(mem),
                          "--report", str(report), "--fill" if fill else "--no-fill"], cwd=ROOT,
                         stderr=subprocess.DEVNULL)
    while not sock.exists():
        time.sleep(0.02)
    res = result(subprocess.run(vmm_args(vmm, sock, mem, size, think_ns), capture_output=True, text=True,
                                check=True).stdout)
    h.send_signal(signal.SIGTERM)
    h.wait(timeout=60)
    (v,) = json.loads(report.read_text())["vmms"]
    assert res["ok"] == "1", res
    return {"p50_us": float(res["p50_us"]), "p99_us": float(res["p99_us"]), "faults": float(res["faults"]),
            "resident_s": v["time_to_resident_seconds"] or float("nan"), "touch_s": float(res["touch_seconds"]),
            "handler_p50_us": v["latency_us"]["p50"], "fill_bytes": v["bytes"]["fill"]}


def run_live(vmm: Path, mem: Path, tmp: Path, size: int, think_ns: int) -> dict[str, float]:
    import socket

    sock, report = tmp / "live.sock", tmp / "live.json"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    h = subprocess.Popen([sys.executable, "-m", "postcopy", "uffd-handler", "--socket", str(sock), "--listen",
                          f"127.0.0.1:{port}", "--report", str(report)], cwd=ROOT, stderr=subprocess.DEVNULL)
    while not sock.exists():
        time.sleep(0.02)
    v = subprocess.Popen([*vmm_args(vmm, sock, mem, size, think_ns), "--wait-eof"], stdout=subprocess.PIPE, text=True)
    src_report = tmp / "live-source.json"
    subprocess.run([sys.executable, "-m", "postcopy", "source", "--mem-file", str(mem), "--connect", f"127.0.0.1:{port}",
                    "--progress", "none", "--json", str(src_report)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    out, _ = v.communicate(timeout=300)
    h.wait(timeout=60)
    res = result(out)
    m = json.loads(report.read_text())["migration"]
    assert res["ok"] == "1", res
    assert m["status"] == "completed", m
    return {"p50_us": float(res["p50_us"]), "p99_us": float(res["p99_us"]), "faults": float(res["faults"]),
            "resident_s": json.loads(src_report.read_text())["total_time_s"], "touch_s": float(res["touch_seconds"]),
            "handler_p50_us": m["fault_latency_us"]["p50"]}


def median(rs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in rs) for k in rs[0]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=1024)
    p.add_argument("--think-ns", type=int, default=2000, help="guest work between two page reads (default 2000)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each handler, interleaved; medians are reported")
    p.add_argument("--live", action="store_true", help="add live mode (a postcopy stream over localhost)")
    p.add_argument("--only-live", action="store_true", help="live mode and the plain handler only")
    args = p.parse_args()
    size = args.size_mib * MiB
    with tempfile.TemporaryDirectory(prefix="uffd-handler-bench-") as d:
        tmp = Path(d)
        vmm, plain = build(tmp)
        mem = tmp / "mem.bin"
        memory_file(mem, size)
        runs: dict[str, list[dict[str, float]]] = {"plain": [], "nofill": [], "fill": [], "live": []}
        for _ in range(args.rounds):   # interleaved, so a noisy neighbour hits all alike
            runs["plain"].append(run_plain(plain, vmm, mem, tmp, size, args.think_ns))
            if not args.only_live:
                runs["nofill"].append(run_ours(vmm, mem, tmp, size, args.think_ns, fill=False))
                runs["fill"].append(run_ours(vmm, mem, tmp, size, args.think_ns, fill=True))
            if args.live or args.only_live:
                runs["live"].append(run_live(vmm, mem, tmp, size, args.think_ns))
    medians = {k: median(v) for k, v in runs.items() if v}
    print(f"guest {args.size_mib} MiB, 4 KiB pages, every page read once in a scattered order, "
          f"{args.think_ns} ns of work between reads; medians of {args.rounds} interleaved rounds")
    print(f"{'handler':<34}{'faults':>9}{'p50 us':>9}{'p99 us':>9}{'resident s':>12}{'handler p50 us':>16}")
    names = {"plain": "plain C (on-demand)", "nofill": "uffd-handler --no-fill", "fill": "uffd-handler (fill)",
             "live": "uffd-handler --listen (live)"}
    for key, r in medians.items():
        print(f"{names[key]:<34}{r['faults']:>9.0f}{r['p50_us']:>9.1f}{r['p99_us']:>9.1f}{r['resident_s']:>12.3f}"
              f"{r.get('handler_p50_us', float('nan')):>16.1f}")
    base = medians["plain"]
    if "live" in medians:
        live = medians["live"]
        print(f"live: fault p50 {live['p50_us'] / base['p50_us']:.1f}x the plain handler's (a network round trip "
              f"instead of a local copy); fully resident after {live['resident_s']:.2f} s of streaming")
    if "fill" not in medians:
        return 0
    nofill, ours = medians["nofill"], medians["fill"]
    p50_ratio = ours["p50_us"] / base["p50_us"]
    p50_nofill = nofill["p50_us"] / base["p50_us"]
    speedup = base["resident_s"] / ours["resident_s"]
    print(f"p50 vs plain: {p50_ratio:.2f}x with fill, {p50_nofill:.2f}x without "
          f"(target <= 1.2x): {'ok' if p50_ratio <= 1.2 else 'miss'}")
    print(f"fully resident {speedup:.1f}x sooner than plain (target >= 2x): {'ok' if speedup >= 2 else 'miss'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
