"""``postcopy dest``: the destination role as its own process.

Without ``--qmp`` it accepts the migration on ``--listen`` (default
127.0.0.1:4444) at once. With ``--save DIR`` (or ``--headless``) no guest runs
here: the memory is made to the measure of the stream's RAM setup (any source,
e.g. ``qemu-system-x86_64`` with postcopy-ram), and with ``--save`` the VM is
written to the snapshot directory DIR once the migration completed. With ``--qmp`` it waits for QMP ``migrate-incoming``
unless ``--listen`` is given, and stays up after the migration until QMP
``quit`` (or ``--linger`` seconds).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from postcopy.cli import UserError
from postcopy.guest import Guest
from postcopy.owner import DestinationMemory, HeadlessMemory
from postcopy.saved import SavingMemory
from postcopy.snapshot import SnapshotError
from postcopy.touch import TouchPattern
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
    p.add_argument("--save", metavar="DIR",
                   help="no guest here: receive any source's VM (e.g. QEMU's) and save it as the snapshot "
                        "directory DIR (docs/snapshot.md); implies --headless")
    p.add_argument("--headless", action="store_true",
                   help="no guest here: memory made to the measure of the stream's RAM setup, device state kept "
                        "as received (the --size/--page-size/--vcpus/--pattern options do not apply)")
    p.add_argument("--touch", metavar="IDSTR[:STRIDE]",
                   help="with --headless/--save: from RUN on, read one byte every STRIDE bytes (default 4096) of "
                        "RAM block IDSTR, top down, as a guest would: each missing page is a page request "
                        "(e.g. --touch pc.ram)")
    p.add_argument("--link-timeout", type=float, default=3.0, metavar="SECONDS",
                   help="a channel silent this long is broken; a preempt channel must come within it (default 3)")
    p.add_argument("--prealloc", action=argparse.BooleanOptionalAction, default=True,
                   help="allocate the built-in guest's memory before the stream (4 KiB pages then live in a memfd "
                        "and are placed with UFFDIO_CONTINUE; zero pages take memory too); default on")
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
    headless = args.headless or args.save is not None
    if headless and args.verify:
        raise UserError("--verify checks the built-in guest; there is none with --save/--headless")
    if args.link_timeout <= 0:
        raise UserError(f"--link-timeout {args.link_timeout} must be positive")
    touch: TouchPattern | None = None
    if args.touch is not None:
        if not headless:
            raise UserError("--touch reads the memory of a destination with no guest: use it with --headless or --save")
        try:
            touch = TouchPattern.parse(args.touch)
        except ValueError as exc:
            raise UserError(f"--touch {exc}") from None
    owner: Callable[[], DestinationMemory] | None = None
    if args.save is not None:
        save_dir = args.save
        try:
            SavingMemory(save_dir)      # says now, not after the migration, that DIR holds a snapshot
        except SnapshotError as exc:
            raise UserError(str(exc)) from None
        owner = lambda: SavingMemory(save_dir, touch=touch)  # noqa: E731
    elif headless:
        owner = lambda: HeadlessMemory(touch=touch)  # noqa: E731
    try:
        service: DestinationService[int] = DestinationService(
            spec, preempt=args.preempt, verify=args.verify, listen=listen, fail_fast=args.fail_fast,
            max_packaged=args.max_packaged,
            options=service_options(args, progress),
            on_listening=lambda a: print(f"listening on {a[0]}:{a[1]}", file=stream, flush=True),
            owner=owner, link_timeout=args.link_timeout, prealloc=args.prealloc,
        )
    except ServiceError as exc:
        raise UserError(str(exc)) from None

    def finish(result: MigrationStats) -> int:
        dest = service.destination
        assert dest is not None
        if headless:
            return _finish_headless(dest.owner, result, service, args, stream)
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
            "requests_resent": result.requests_resent,
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



def _finish_headless(owner: DestinationMemory, result: MigrationStats, service: DestinationService[int],
                     args: argparse.Namespace, stream: TextIO) -> int:
    """No guest: save the snapshot (--save) and write the report."""
    report: dict[str, Any] = {
        "role": "destination",
        "status": result.status.value,
        "recoveries": result.recoveries,
        "paused_seconds": round(result.paused_ns / 1e9, 4),
        "pages": {"received": result.pages_received, "total": result.pages_total},
        "bytes_received": result.bytes,
        "remote_faults": result.remote_faults,
        "requests_sent": result.requests_sent,
        "requests_resent": result.requests_resent,
        "started_ns": result.started_ns,
        "guest_started_ns": result.guest_started_ns,
        "finished_ns": result.finished_ns,
        "blocks": [{"idstr": b.idstr, "used_length": b.used_length, "page_size": b.page_size}
                   for b in owner.ram_blocks()],
        "timeline": list(service.timeline),
    }
    if isinstance(owner, HeadlessMemory) and owner.toucher is not None:
        owner.toucher.wait()            # every page is there: the last reads end at once
        stats = owner.touch_stats()
        assert stats is not None
        report["touch"] = stats.as_dict()
    if isinstance(owner, SavingMemory):
        t0 = time.monotonic()
        try:
            snap = owner.save()
        except (SnapshotError, OSError) as exc:
            raise UserError(f"the migration completed, but saving it failed: {exc}") from None
        report["snapshot"] = {"directory": str(snap.directory), "machine_type": snap.machine_type,
                              "devices": len(snap.devices), "allocated_bytes": snap.allocated_bytes(),
                              "save_seconds": round(time.monotonic() - t0, 3)}
        print(f"saved the VM ({snap.machine_type}, {len(snap.blocks)} RAM blocks, {len(snap.devices)} device "
              f"sections) to {snap.directory}", file=stream, flush=True)
    write_json(report, args.json)
    return 0
