"""``postcopy report RUN.json``: summarise a demo or destination report, and plot it.

``--plot out.png`` draws the fault-latency histogram and the timeline
(throughput and faults per sampling interval, pages received) with matplotlib,
from the ``latency_histogram`` and ``timeline`` the report carries.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

from postcopy.cli import UserError

from .common import write_json

__all__ = ["add_arguments", "main", "plot", "run", "summarise"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN.json", help="a report written by postcopy demo/dest --json")
    p.add_argument("--plot", metavar="OUT.png", help="draw the latency histogram and the timeline here")
    p.add_argument("--json", metavar="PATH|-", help="write the summary as JSON")


def _load(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object (a postcopy report), found {type(data).__name__}")
    return data


def _series(report: dict[str, Any], path: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    timeline = report.get("timeline")
    hist = report.get("latency_histogram")
    if not isinstance(timeline, list) or not isinstance(hist, dict):
        raise UserError(f"{path}: no timeline or latency_histogram: write it with postcopy demo --json or postcopy dest --json")
    try:
        bounds = [float(b) for b in hist["bounds_s"]]
        counts = [int(c) for c in hist["counts"]]
        points = [{k: float(p[k]) for k in ("t", "pages", "bytes", "faults")} for p in timeline]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{path}: malformed timeline or latency_histogram ({exc!r})") from None
    if len(counts) != len(bounds) + 1:
        raise UserError(f"{path}: latency_histogram has {len(counts)} counts for {len(bounds)} bounds (expected bounds + 1)")
    return points, {"bounds_s": bounds, "counts": counts}


def summarise(report: dict[str, Any], path: str) -> dict[str, Any]:
    points, hist = _series(report, path)
    duration = points[-1]["t"] if points else 0.0
    total_bytes = points[-1]["bytes"] if points else 0.0
    peak = 0.0
    for a, b in itertools.pairwise(points):
        if b["t"] > a["t"]:
            peak = max(peak, (b["bytes"] - a["bytes"]) / (b["t"] - a["t"]))
    return {
        "status": report.get("status"),
        "samples": len(points),
        "duration_s": duration,
        "bytes": int(total_bytes),
        "mean_throughput_bytes_per_s": int(total_bytes / duration) if duration > 0 else 0,
        "peak_throughput_bytes_per_s": int(peak),
        "faults": int(points[-1]["faults"]) if points else 0,
        "latency_samples": sum(hist["counts"]),
        "fault_latency_us": report.get("fault_latency_us"),
    }


def plot(report: dict[str, Any], path: str, out: str) -> None:
    """Two panels: the latency histogram (log buckets) and throughput / faults over time."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'postcopy[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, hist = _series(report, path)
    fig, (ax_h, ax_t) = plt.subplots(2, 1, figsize=(9, 8), constrained_layout=True)
    bounds_us = [b * 1e6 for b in hist["bounds_s"]]
    labels = [f"≤{_us(b)}" for b in bounds_us] + [f">{_us(bounds_us[-1])}"]
    ax_h.bar(range(len(labels)), hist["counts"], color="tab:blue")
    ax_h.set_xticks(range(len(labels)), labels, rotation=60, fontsize=8)
    ax_h.set_ylabel("faults")
    ax_h.set_title(f"fault -> placed latency ({sum(hist['counts'])} faults)")
    ts = [p["t"] for p in points]
    rate = [0.0] + [(b["bytes"] - a["bytes"]) / (b["t"] - a["t"]) / 1e6 if b["t"] > a["t"] else 0.0
                    for a, b in itertools.pairwise(points)]
    faults = [0.0] + [b["faults"] - a["faults"] for a, b in itertools.pairwise(points)]
    ax_t.plot(ts, rate, color="tab:green", label="throughput (MB/s)")
    ax_t.set_xlabel("seconds since the migration started")
    ax_t.set_ylabel("MB/s")
    ax_f = ax_t.twinx()
    ax_f.step(ts, faults, color="tab:red", where="post", label="faults per sample")
    ax_f.set_ylabel("faults per sample")
    ax_t.set_title(f"timeline (status {report.get('status')})")
    handles = ax_t.get_legend_handles_labels()[0] + ax_f.get_legend_handles_labels()[0]
    ax_t.legend(handles, [str(h.get_label()) for h in handles], loc="upper right")
    try:
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise UserError(f"cannot write the plot to {out}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)


def _us(value: float) -> str:
    return f"{value / 1000:g} ms" if value >= 1000 else f"{value:g} us"


def run(args: argparse.Namespace) -> int:
    report = _load(args.run)
    summary = summarise(report, args.run)
    if args.plot:
        plot(report, args.run, args.plot)
    if args.json:
        write_json(summary, args.json)
    if args.json != "-":
        lat = summary["fault_latency_us"] or {}
        print(f"{args.run}: {summary['status']}, {summary['bytes'] / 1e6:.1f} MB in {summary['duration_s']:.3f} s "
              f"(mean {summary['mean_throughput_bytes_per_s'] / 1e6:.0f} MB/s, peak "
              f"{summary['peak_throughput_bytes_per_s'] / 1e6:.0f} MB/s), {summary['faults']} faults, "
              f"latency p50 {lat.get('p50', '-')} us p99 {lat.get('p99', '-')} us")
        if args.plot:
            print(f"plot written to {args.plot}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python3 -m postcopy.commands.report``) until the CLI registers ``report``."""
    parser = argparse.ArgumentParser(prog="postcopy report", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as exc:
        print(f"postcopy report: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
