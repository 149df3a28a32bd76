"""Options and reports shared by the role commands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from postcopy.cli import UserError
from postcopy.spec import GuestSpec, SpecError, parse_page_size, parse_size

__all__ = ["add_guest_arguments", "guest_spec", "parse_address", "percentiles_us", "write_json"]


def add_guest_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("guest (both sides must be started with the same values)")
    g.add_argument("--size", default="1G", help="size of the main RAM block (default 1G)")
    g.add_argument("--page-size", default="4K", choices=["4K", "2M", "1G"], help="host page size of the main block")
    g.add_argument("--vcpus", type=int, default=2, help="guest vCPU threads (default 2)")
    g.add_argument("--pattern", default="seq", choices=["seq", "random", "hot"], help="guest workload")
    g.add_argument("--write-percent", type=int, default=50, help="share of guest accesses that write")
    g.add_argument("--seed", type=int, default=1, help="workload seed")
    g.add_argument("--guest-rate", type=int, default=0, help="accesses per second per vCPU (0 = as fast as it goes)")
    p.add_argument("--preempt", action=argparse.BooleanOptionalAction, default=True,
                   help="send requested pages on a separate preempt channel (default on)")


def guest_spec(args: argparse.Namespace) -> GuestSpec:
    try:
        return GuestSpec.simple(
            parse_size(args.size), parse_page_size(args.page_size), vcpus=args.vcpus, pattern=args.pattern,
            seed=args.seed, write_percent=args.write_percent, rate_limit=args.guest_rate,
        )
    except SpecError as exc:
        raise UserError(str(exc)) from None


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise UserError(f"address {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def percentiles_us(samples_ns: list[int]) -> dict[str, float]:
    if not samples_ns:
        return {"p50": 0.0, "p99": 0.0, "p999": 0.0, "max": 0.0, "count": 0}
    s = sorted(samples_ns)

    def at(q: float) -> float:
        return round(s[min(len(s) - 1, int(q * len(s)))] / 1000, 1)

    return {"p50": at(0.5), "p99": at(0.99), "p999": at(0.999), "max": round(s[-1] / 1000, 1), "count": len(s)}


def write_json(report: dict[str, Any], where: str | None) -> None:
    if where is None:
        return
    text = json.dumps(report, indent=2, sort_keys=True)
    if where == "-":
        print(text)
    else:
        Path(where).write_text(text + "\n")


def write_hashes(path: str, hashes: dict[str, bytes]) -> None:
    """Per-page hashes of every block, for --verify across processes."""
    Path(path).write_text(json.dumps({k: v.hex() for k, v in hashes.items()}))


def read_hashes(path: str) -> dict[str, bytes]:
    return {k: bytes.fromhex(v) for k, v in json.loads(Path(path).read_text()).items()}


def fail(message: str) -> int:
    print(message, file=sys.stderr)
    return 1
