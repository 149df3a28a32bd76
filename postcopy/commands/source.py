"""``postcopy source``: the source role as its own process.

Without ``--qmp`` it connects to ``--connect`` after ``--warmup`` and switches
to postcopy at once. With ``--qmp`` it waits for QMP ``migrate tcp:HOST:PORT``
(the ``postcopy-ram`` capability on) and holds the switch to postcopy until
``migrate-start-postcopy``; it stays up afterwards until QMP ``quit`` (or
``--linger`` seconds).

With ``--from-snapshot DIR`` it migrates a saved VM (``postcopy dest --save``)
instead of the built-in guest, e.g. into ``qemu-system-x86_64 -incoming``
started with the VM's machine arguments and the postcopy capabilities: the
switch to postcopy is immediate, so that QEMU runs the VM at once and pulls its
pages on demand while the rest streams (a lazy restore). Preempt is off by
default there (QEMU's default); ``--preempt`` when QEMU has postcopy-preempt on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from postcopy.cli import UserError
from postcopy.guest import Guest, Pattern
from postcopy.hotset import HotSet, HotSetError
from postcopy.saved import SnapshotMemory
from postcopy.snapshot import SnapshotError
from postcopy.source import Source
from postcopy.service import MigrationAbandoned, ServiceError, SourceService
from postcopy.session import MigrationFailed, MigrationStats
from postcopy.owner import HeadlessMemory, memory_from_file
from postcopy.spec import BlockSpec, GuestSpec, SpecError, parse_size

from .common import (
    Progress,
    add_guest_arguments,
    add_precopy_arguments,
    add_service_arguments,
    guest_spec,
    parse_address,
    precopy_policy,
    service_options,
    write_hashes,
    failure_report,
    write_json,
)

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--connect", default="127.0.0.1:4444",
                   help="HOST:PORT of the destination (ignored with --qmp: QMP migrate names it)")
    add_guest_arguments(p)
    p.set_defaults(preempt=None)    # on, except with --from-snapshot
    p.add_argument("--from-snapshot", metavar="DIR",
                   help="migrate the saved VM of this snapshot directory (docs/snapshot.md), not the built-in guest")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds the guest runs before the switch")
    p.add_argument("--bandwidth-cap", default="0", help="bytes per second for the background stream (0 = none)")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True,
                   help="with preempt, send pages ahead of sequential and strided page-request streams "
                        "(default on)")
    p.add_argument("--hot-set", metavar="FILE",
                   help="push this hot set (recorded by an earlier migration of the same guest with "
                        "--record-hot-set) first after the switch; what does not fit is left out with a warning")
    p.add_argument("--record-hot-set", metavar="FILE",
                   help="record the pages the destination asks for (and those sent ahead), in the order of their "
                        "first request, and write them here as a hot set once the migration completed "
                        "(with --hot-set, the pages pushed from it too)")
    p.add_argument("--connect-timeout", type=float, default=30.0, help="seconds to wait for the destination")
    p.add_argument("--recover-connect", metavar="HOST:PORT",
                   help="after a pause, reconnect here instead of --connect (e.g. where a paused QEMU destination "
                        "listens after migrate-recover); with --qmp, QMP migrate with resume names it")
    p.add_argument("--verify", action="store_true", help="hash every page at the switch (compare with the destination's)")
    p.add_argument("--hashes-out", help="write the pages' hashes at the switch here")
    p.add_argument("--json", metavar="PATH|-", help="write the JSON report")
    mem = p.add_argument_group("memory file (instead of the built-in guest)")
    mem.add_argument("--mem-file", metavar="FILE",
                     help="send the contents of this file as one RAM block, with no guest (e.g. a Firecracker "
                          "snapshot's memory, to postcopy uffd-handler --listen)")
    mem.add_argument("--mem-idstr", default="mem", help="the block's idstr (default mem)")
    mem.add_argument("--mem-page-size", default="4K", choices=["4K", "2M"],
                     help="the block's host page size: the VMM's regions' page size (default 4K)")
    add_precopy_arguments(p)
    add_service_arguments(p)


def _recover_connect(args: argparse.Namespace) -> tuple[str, int] | None:
    return parse_address(args.recover_connect) if args.recover_connect else None


def _report(result: MigrationStats, timeline: list[dict[str, object]]) -> dict[str, Any]:
    c = result.counters
    return {
        "role": "source",
        "status": result.status.value,
        "recoveries": result.recoveries,
        "paused_seconds": round(result.paused_ns / 1e9, 4),
        "downtime_ms": round(result.downtime_ns / 1e6, 3),
        "stopped_ns": result.stopped_ns,
        "total_time_s": (result.finished_ns - result.started_ns) / 1e9,
        "postcopy_time_s": (result.finished_ns - result.stopped_ns) / 1e9,
        "bytes_transferred": c["main_bytes"] + c["preempt_bytes"],
        "pages": {"normal": c["main_pages_normal"] + c["preempt_pages_normal"],
                  "zero": c["main_pages_zero"] + c["preempt_pages_zero"],
                  "requested": c["request_pages_sent"]},
        "requests_received": c["requests"],
        "prefetch": result.prefetch.as_dict() if result.prefetch is not None else None,
        "hot_set": result.hot_set.as_dict() if result.hot_set is not None else None,
        "bad_requests": result.bad_requests,
        "discard_ranges": result.discard_ranges,
        "precopy": result.precopy.as_dict() if result.precopy is not None else None,
        "counters": c,
        "timeline": timeline,
    }


def _hot_set(args: argparse.Namespace) -> HotSet | None:
    """The --hot-set file, read before anything is migrated (a file that is not a hot set is an error)."""
    if args.hot_set is None:
        return None
    try:
        return HotSet.load(args.hot_set)
    except HotSetError as exc:
        raise UserError(f"--hot-set {exc}") from None


def _save_hot_set(args: argparse.Namespace, source: Source | None) -> None:
    if args.record_hot_set is None or source is None:
        return
    try:
        source.recorded_hot_set().save(args.record_hot_set)
    except (OSError, HotSetError) as exc:
        raise UserError(f"--record-hot-set {args.record_hot_set}: {exc}") from None


def run(args: argparse.Namespace) -> int:
    if args.preempt is None:
        args.preempt = args.from_snapshot is None
    if args.from_snapshot is not None:
        return _run_snapshot(args)
    if args.mem_file is not None:
        return _run_mem_file(args)
    hot_set = _hot_set(args)
    spec = guest_spec(args)
    policy = precopy_policy(args)
    address = None if args.qmp else parse_address(args.connect)
    try:
        cap = parse_size(args.bandwidth_cap)
    except SpecError as exc:
        raise UserError(f"--bandwidth-cap: {exc}") from None
    stream = sys.stderr if args.json == "-" else sys.stdout
    progress = Progress("source", args.progress, stream)
    options = service_options(args, progress)
    memory = spec.build_memory()
    w = spec.workload()
    guest = Guest([(b.addr, b.used_length, b.page_size) for b in memory], nvcpus=spec.vcpus,
                  pattern=Pattern[spec.pattern.upper()], seed=spec.seed, write_percent=spec.write_percent,
                  rate_limit=int(str(w["rate_limit"])))
    service: SourceService[int] | None = None
    try:
        guest.fill_initial()
        guest.start()
        time.sleep(args.warmup)
        try:
            service = SourceService(spec, memory, guest, preempt=args.preempt, bandwidth_cap=cap,
                                    verify=args.verify, connect=address, connect_timeout=args.connect_timeout,
                                    recover_connect=_recover_connect(args),
                                    options=options, precopy=policy, tracking=args.dirty_tracking,
                                    prefetch=args.prefetch, hot_set=hot_set,
                                    record_hot_set=args.record_hot_set is not None)
        except ServiceError as exc:
            raise UserError(str(exc)) from None
        svc = service

        def finish(result: MigrationStats) -> int:
            src = service.source
            if args.hashes_out and src is not None and src.hashes:
                write_hashes(args.hashes_out, src.hashes)
            write_json(_report(result, list(svc.timeline)), args.json)
            _save_hot_set(args, src)
            return 0

        try:
            outcome = service.run(finish)
        except MigrationAbandoned as exc:
            progress.close()
            print(f"postcopy source: {exc}; exiting", file=sys.stderr, flush=True)
            os._exit(1)     # the role's threads still read guest memory: do not unmap it under them
        except ServiceError as exc:
            raise UserError(str(exc)) from None
        err = outcome.error
        if err is not None and args.json:
            write_json(failure_report("source", err, list(svc.timeline)), args.json)
        if isinstance(err, MigrationFailed) and err.kind == "connect":
            raise UserError(f"no destination answers at {args.connect if address else 'the migrate URI'}")
        if isinstance(err, MigrationFailed):
            raise UserError(f"migration failed ({err.kind}): {err}")
        if isinstance(err, ConnectionRefusedError):
            raise UserError(f"no destination answers at {args.connect if address else 'the migrate URI'}")
        if isinstance(err, OSError):
            raise UserError(f"migration failed: {err.strerror or err}")
        if err is not None:
            raise UserError(f"migration failed ({getattr(err, 'kind', type(err).__name__)}): {err}")
        return int(outcome.finished or 0)
    finally:
        progress.close()
        if service is None or not service.worker_running:
            guest.close()
            memory.close()


def _run_mem_file(args: argparse.Namespace) -> int:
    """Send a memory file (no guest runs: nothing is dirtied, the switch to postcopy comes at once)."""
    try:
        page_size = parse_size(args.mem_page_size)
    except SpecError as exc:
        raise UserError(str(exc)) from None
    try:
        memory = memory_from_file(args.mem_file, args.mem_idstr, page_size)
    except (OSError, ValueError) as exc:
        raise UserError(f"--mem-file {args.mem_file}: {exc}") from None
    (block,) = list(memory)
    spec = GuestSpec(blocks=(BlockSpec(block.idstr, block.used_length, page_size),), vcpus=0)
    return _run_headless(args, spec, HeadlessMemory(memory), verify=args.verify)


def _run_snapshot(args: argparse.Namespace) -> int:
    """``--from-snapshot DIR``: the saved VM is the source; nothing runs here."""
    if args.verify:
        raise UserError("--verify hashes the built-in guest's pages; not with --from-snapshot")
    try:
        owner = SnapshotMemory.open(args.from_snapshot)
    except SnapshotError as exc:
        raise UserError(str(exc)) from None
    return _run_headless(args, guest_spec(args), owner, verify=False)


def _run_headless(args: argparse.Namespace, spec: GuestSpec, owner: HeadlessMemory | SnapshotMemory, *,
                  verify: bool) -> int:
    """Migrate memory that no guest here writes (a memory file, a saved VM) through the service."""
    address = None if args.qmp else parse_address(args.connect)
    try:
        cap = parse_size(args.bandwidth_cap)
        hot_set = _hot_set(args)
    except SpecError as exc:
        owner.close()
        raise UserError(f"--bandwidth-cap: {exc}") from None
    except UserError:
        owner.close()
        raise
    stream = sys.stderr if args.json == "-" else sys.stdout
    progress = Progress("source", args.progress, stream)
    service: SourceService[int] | None = None
    try:
        try:
            service = SourceService(spec, owner.ram_blocks(), None, preempt=args.preempt, bandwidth_cap=cap,
                                    verify=verify, connect=address, connect_timeout=args.connect_timeout,
                                    recover_connect=_recover_connect(args),
                                    options=service_options(args, progress), owner=owner,
                                    prefetch=args.prefetch, hot_set=hot_set,
                                    record_hot_set=args.record_hot_set is not None)
        except ServiceError as exc:
            raise UserError(str(exc)) from None
        svc = service

        def finish(result: MigrationStats) -> int:
            write_json(_report(result, list(svc.timeline)), args.json)
            _save_hot_set(args, svc.source)
            return 0

        try:
            outcome = service.run(finish)
        except MigrationAbandoned as exc:
            progress.close()
            print(f"postcopy source: {exc}; exiting", file=sys.stderr, flush=True)
            os._exit(1)     # the role's threads still read the mapped memory: do not unmap it under them
        except ServiceError as exc:
            raise UserError(str(exc)) from None
        if outcome.error is not None and args.json:
            write_json(failure_report("source", outcome.error, list(svc.timeline)), args.json)
        _raise_outcome(outcome.error, args, address)
        return int(outcome.finished or 0)
    finally:
        progress.close()
        if service is None or not service.worker_running:
            owner.close()


def _raise_outcome(err: BaseException | None, args: argparse.Namespace, address: object) -> None:
    if (isinstance(err, MigrationFailed) and err.kind == "connect") or isinstance(err, ConnectionRefusedError):
        raise UserError(f"no destination answers at {args.connect if address else 'the migrate URI'}")
    if isinstance(err, MigrationFailed):
        raise UserError(f"migration failed ({err.kind}): {err}")
    if isinstance(err, OSError):
        raise UserError(f"migration failed: {err.strerror or err}")
    if err is not None:
        raise UserError(f"migration failed ({getattr(err, 'kind', type(err).__name__)}): {err}")
