"""``postcopy dest``: the destination role as its own process.

Without ``--qmp`` it accepts the migration on ``--listen`` (default
127.0.0.1:4444) at once. With ``--qmp`` it waits for QMP ``migrate-incoming``
unless ``--listen`` is given, and stays up after the migration until QMP
``quit`` (or ``--linger`` seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from postcopy.cli import UserError
from postcopy.guest import Guest
from postcopy.session import MigrationFailed, MigrationStats
from postcopy.service import DestinationService, MigrationAbandoned, ServiceError

from .common import (
    Progress,
    add_guest_arguments,
    add_service_arguments,
    guest_spec,
    parse_address,
    percentiles_us,
    service_options,
    write_hashes,
    failure_report,
    write_json,
)

__all__ = ["add_arguments", "run"]

DEFAULT_LISTEN = "127.0.0.1:4444"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default=None,
                   help=f"HOST:PORT to accept the migration on (default {DEFAULT_LISTEN}; "
                        "with --qmp, none: wait for migrate-incoming)")
    add_guest_arguments(p)
    p.add_argument("--verify", action="store_true",
                   help="hash every page as placed and check the guest's own invariant at the end")
    p.add_argument("--run-after", type=float, default=0.5, help="seconds the guest runs after the migration")
    p.add_argument("--hashes-out", help="write the placed pages' hashes here (for --verify across processes)")
    p.add_argument("--json", metavar="PATH|-", help="write the JSON report (also when the migration fails)")
    p.add_argument("--fail-fast", action="store_true",
                   help="fail on the first malformed or stalled stream before RUN, as QEMU does "
                        "(default: drop it and keep listening for the real source)")
    p.add_argument("--max-packaged", type=int, metavar="BYTES", default=None,
                   help="largest PACKAGED (device state at the switch) a connection may buffer "
                        "(default 16 MiB, QEMU's own limit)")
    add_service_arguments(p)


def run(args: argparse.Namespace) -> int:
    spec = guest_spec(args)
    listen_text = args.listen or (None if args.qmp else DEFAULT_LISTEN)
    listen = parse_address(listen_text) if listen_text else None
    stream = sys.stderr if args.json == "-" else sys.stdout
    progress = Progress("dest", args.progress, stream)
    try:
        service: DestinationService[int] = DestinationService(
            spec, preempt=args.preempt, verify=args.verify, listen=listen, fail_fast=args.fail_fast,
            max_packaged=args.max_packaged,
            options=service_options(args, progress),
            on_listening=lambda a: print(f"listening on {a[0]}:{a[1]}", file=stream, flush=True),
        )
    except ServiceError as exc:
        raise UserError(str(exc)) from None

    def finish(result: MigrationStats) -> int:
        dest = service.destination
        assert dest is not None
        guest = dest.guest
        assert isinstance(guest, Guest)
        time.sleep(args.run_after)
        guest.stop()
        report: dict[str, Any] = {
            "role": "destination",
            "status": result.status.value,
            "recoveries": result.recoveries,
            "paused_seconds": round(result.paused_ns / 1e9, 4),
            "pages": {"received": result.pages_received, "total": result.pages_total},
            "remote_faults": result.remote_faults,
            "requests_sent": result.requests_sent,
            "duplicate_host_pages": result.duplicate_host_pages,
            "fault_latency_us": percentiles_us(dest.latencies_ns),
            "latency_histogram": service.latency_histogram.to_json(),
            "blocktime_ms": result.blocktime_ns / 1e6,
            "vcpu_blocktime_ms": [ns / 1e6 for ns in result.vcpu_blocktime_ns],
            "source_stopped_ns": result.source_stopped_ns,
            "guest_started_ns": result.guest_started_ns,
            "finished_ns": result.finished_ns,
            "guest_steps": guest.stats().total_steps,
            "timeline": list(service.timeline),
        }
        if args.verify:
            v = guest.verify()
            report["guest_verify"] = {"ok": v.ok, "pages_checked": v.pages_checked,
                                      "pages_mismatched": v.pages_mismatched, "summary": v.summary()}
            if args.hashes_out:
                write_hashes(args.hashes_out, {b.idstr: dest.path.placed_hashes(i) for i, b in enumerate(dest.memory)})
        write_json(report, args.json)
        return 0 if not args.verify or report["guest_verify"]["ok"] else 1

    try:
        outcome = service.run(finish)
    except MigrationAbandoned as exc:
        progress.close()
        print(f"postcopy dest: {exc}; exiting", file=sys.stderr, flush=True)
        os._exit(1)         # the role's threads still use guest memory: do not unmap it under them
    except ServiceError as exc:
        raise UserError(str(exc)) from None
    finally:
        progress.close()
        if service.destination is not None and not service.worker_running:
            service.destination.close()
    if outcome.error is not None:
        err = outcome.error
        if args.json:
            write_json(failure_report("destination", err, list(service.timeline)), args.json)
        if isinstance(err, MigrationFailed):
            raise UserError(f"migration failed ({err.kind}): {err}")
        if isinstance(err, OSError):
            raise UserError(f"migration failed: {err.strerror or err}")
        raise UserError(f"migration failed ({getattr(err, 'kind', type(err).__name__)}): {err}")
    return int(outcome.finished or 0)

