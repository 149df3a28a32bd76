"""``postcopy uffd-handler``: serve the page faults of VMMs that hand over their
userfaultfd (Firecracker's ``mem_backend: {"backend_type": "Uffd"}``) from a
snapshot memory file, with a background fill, metrics and a JSON report; or,
with ``--listen``, serve one VMM live from a postcopy stream."""

from __future__ import annotations

import argparse
from pathlib import Path

from postcopy.cli import UserError
from postcopy.commands.common import write_json

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket the VMMs connect to (backend_path)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--mem-file", metavar="FILE", help="guest memory file (the snapshot's mem_file_path)")
    src.add_argument("--listen", metavar="HOST:PORT",
                     help="live mode: serve one VMM from the postcopy stream accepted here "
                          "(postcopy source --mem-file FILE --connect HOST:PORT)")
    p.add_argument("--fill", action=argparse.BooleanOptionalAction, default=True,
                   help="copy pages nobody faulted on in the background, 64 KiB to 4 MiB at a time (default on)")
    p.add_argument("--metrics-port", type=int, metavar="N", help="serve Prometheus metrics on this port (0 = any free one)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address the metrics endpoint binds (default 127.0.0.1)")
    p.add_argument("--report", metavar="FILE.json", help="write the JSON report here (rewritten as VMMs come and go, "
                                                         "and at exit; '-' prints it at exit)")
    p.add_argument("--inject-crash-after-faults", type=int, default=0, metavar="N",
                   help="testing: the first serving process kills itself (SIGKILL) after reading N faults of a VMM")
    live = p.add_argument_group("live mode (--listen)")
    live.add_argument("--preempt", action=argparse.BooleanOptionalAction, default=True,
                      help="accept the postcopy-preempt channel (the source must agree; default on)")
    live.add_argument("--qmp", metavar="PATH|HOST:PORT", help="QMP control socket (migrate-pause, migrate-recover, "
                                                               "query-migrate)")
    live.add_argument("--linger", type=float, default=0.0, metavar="SECONDS",
                      help="keep serving metrics and QMP this long after the migration ends (default 0)")


def run(args: argparse.Namespace) -> int:
    from metrics import serve_metrics
    from postcopy.handler import Supervisor, SupervisorOptions, install_signal_handlers
    from postcopy.handler._report import HandlerCollector
    from prometheus_client import CollectorRegistry

    if args.listen is not None:
        return _run_live(args)
    if not Path(args.mem_file).is_file():
        raise UserError(f"--mem-file {args.mem_file}: not a file")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UserError(f"--metrics-port {args.metrics_port} is out of range 0..65535")
    if Path(args.socket).exists() and not Path(args.socket).is_socket():
        raise UserError(f"--socket {args.socket} exists and is not a socket")
    holder: list[Supervisor] = []

    def rewrite_report() -> None:
        if args.report and args.report != "-" and holder:
            write_json(holder[0].report(), args.report)

    try:
        supervisor = Supervisor(SupervisorOptions(socket_path=args.socket, mem_file=args.mem_file, fill=args.fill,
                                                  crash_after_faults=args.inject_crash_after_faults,
                                                  on_change=rewrite_report))
    except (OSError, ValueError) as exc:
        raise UserError(str(exc)) from None
    holder.append(supervisor)
    install_signal_handlers(supervisor)
    metrics_server = None
    if args.metrics_port is not None:
        registry = CollectorRegistry()
        registry.register(HandlerCollector(supervisor))
        try:
            metrics_server = serve_metrics(registry, args.metrics_port, args.metrics_addr)
        except OSError as exc:
            raise UserError(str(exc)) from None
        host, port = metrics_server.address
        print(f"uffd-handler: metrics on http://{host}:{port}/metrics", flush=True)
    try:
        supervisor.run()
    except OSError as exc:
        raise UserError(f"{args.socket}: {exc}") from None
    finally:
        if metrics_server is not None:
            metrics_server.close()
    write_json(supervisor.report(), args.report)
    return 0


def _run_live(args: argparse.Namespace) -> int:
    from postcopy.commands.common import parse_address
    from postcopy.handler._live import LiveOptions, run_live

    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise UserError(f"--metrics-port {args.metrics_port} is out of range 0..65535")
    if args.inject_crash_after_faults or not args.fill:
        raise UserError("--inject-crash-after-faults and --no-fill are for --mem-file mode (live mode has no fill: "
                        "the stream is the fill)")
    if Path(args.socket).exists() and not Path(args.socket).is_socket():
        raise UserError(f"--socket {args.socket} exists and is not a socket")

    def ready(service: object) -> None:
        address = getattr(service, "metrics_address", None)
        if address is not None:
            print(f"uffd-handler: metrics on http://{address[0]}:{address[1]}/metrics", flush=True)

    options = LiveOptions(socket_path=args.socket, listen=parse_address(args.listen), preempt=args.preempt,
                          metrics_port=args.metrics_port, metrics_addr=args.metrics_addr, qmp=args.qmp,
                          linger=args.linger, on_ready=ready)
    try:
        return run_live(options, lambda report: write_json(report, args.report))
    except OSError as exc:
        raise UserError(str(exc)) from None
