"""Hot sets: remote faults and time of a `hot` guest with and without the hot set of an earlier run.

For each case, one `postcopy demo --record-hot-set` records the hot set, then the demo
runs with it and without it, interleaved (with, without, with, without, ...), so that a
change in the machine's load hits both alike. A pair starts only once the 1-minute load
average is below --max-load (checked every 60 s, up to --max-wait seconds, then it runs
anyway; the load at its start is recorded with the rows, so a loaded machine shows).

Cases (1 GiB `hot` guest: 90 % of its accesses go to its first 10 %, the rest anywhere):
  * default: the guest flat out, the background stream uncapped (the default demo);
  * repeat:  the guest at a fixed access rate (--guest-rate) and the stream capped
             (--bandwidth-cap): a workload that does the same again after a restore, whose
             postcopy phase lasts seconds.

Figures per row: remote faults, postcopy time (switch -> last page), total time, hot set
pages pushed (and of them on the preempt channel).

Usage: python3 bench/hot_set.py [--runs 3] [--size 1G] [--cases default,repeat] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _load import add_load_options, wait_for_load

CASES: dict[str, list[str]] = {
    "default": [],
    "repeat": ["--guest-rate", "20000", "--bandwidth-cap", "200M"],
}


def demo(size: str, extra: list[str], *, hot: Path | None, record: Path | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo.json"
        cmd = [sys.executable, "-m", "postcopy", "demo", "--size", size, "--pattern", "hot", *extra,
               "--progress", "none", "--verify", "--json", str(out)]
        if hot is not None:
            cmd += ["--hot-set", str(hot)]
        if record is not None:
            cmd += ["--record-hot-set", str(record)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stdout}\n{r.stderr}")
        d: dict[str, Any] = json.loads(out.read_text())
    hs = d.get("hot_set") or {}
    return {"verified": d["verified"], "remote_faults": d["remote_faults"], "postcopy_s": d["postcopy_time_s"],
            "total_s": d["total_time_s"], "hot_pages": hs.get("pages", 0), "pushed": hs.get("pushed", 0),
            "recorded": hs.get("recorded", 0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--cases", default="default,repeat")
    add_load_options(ap, max_wait=60.0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    print(f"{'case':8} {'hot set':8} {'load':>5} {'faults':>7} {'postcopy s':>10} {'total s':>8} "
          f"{'pushed':>7} {'verified':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            path = Path(tmp) / f"{case}.hot"
            load = wait_for_load(args.max_load, args.max_wait, poll=60)
            rec = demo(args.size, CASES[case], hot=None, record=path)
            print(f"{case:8} {'record':8} {load:5.2f} {rec['remote_faults']:7d} {rec['postcopy_s']:10.3f} "
                  f"{rec['total_s']:8.3f} {rec['recorded']:7d} {rec['verified']!s:>8}", flush=True)
            for _ in range(args.runs):
                load = wait_for_load(args.max_load, args.max_wait, poll=60)     # once a pair: both see the same machine
                for with_hot in (True, False):
                    row = demo(args.size, CASES[case], hot=path if with_hot else None, record=None)
                    row.update(case=case, hot_set=with_hot, load=load, set_pages=rec["recorded"])
                    rows.append(row)
                    print(f"{case:8} {'with' if with_hot else 'without':8} {load:5.2f} {row['remote_faults']:7d} "
                          f"{row['postcopy_s']:10.3f} {row['total_s']:8.3f} {row['pushed']:7d} "
                          f"{row['verified']!s:>8}", flush=True)

    summary: dict[str, Any] = {}
    for case in args.cases.split(","):
        for with_hot in (True, False):
            sel = [r for r in rows if r["case"] == case and r["hot_set"] is with_hot]
            summary[f"{case}/{'with' if with_hot else 'without'}"] = {
                k: statistics.median(r[k] for r in sel) for k in ("remote_faults", "postcopy_s", "total_s")}
    print("\nmedians:")
    for name, m in summary.items():
        print(f"  {name:16} {m['remote_faults']:7.0f} faults, postcopy {m['postcopy_s']:.3f} s, "
              f"total {m['total_s']:.3f} s")
    loads = [r["load"] for r in rows]
    print(f"load at the start of a run: {min(loads):.2f}..{max(loads):.2f}"
          + ("" if max(loads) < args.max_load else f" (above {args.max_load}: a loaded machine)"))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "medians": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
