"""``postcopy uffd-handler``: serve the page faults of VMMs that hand over their
userfaultfd (Firecracker's ``mem_backend: {"backend_type": "Uffd"}``) from a
snapshot memory file, with a background fill, metrics and a JSON report."""

from __future__ import annotations

import argparse
from pathlib import Path

from postcopy.cli import UserError
from postcopy.commands.common import write_json

__all__ = ["add_arguments", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", required=True, metavar="PATH", help="Unix socket the VMMs connect to (backend_path)")
    p.add_argument("--mem-file", required=True, metavar="FILE", help="guest memory file (the snapshot's mem_file_path)")
    p.add_argument("--fill", action=argparse.BooleanOptionalAction, default=True,
                   help="copy pages nobody faulted on in the background, 64 KiB to 4 MiB at a time (default on)")
    p.add_argument("--metrics-port", type=int, metavar="N", help="serve Prometheus metrics on this port (0 = any free one)")
    p.add_argument("--metrics-addr", default="127.0.0.1", help="address the metrics endpoint binds (default 127.0.0.1)")
    p.add_argument("--report", metavar="FILE.json", help="write the JSON report here (rewritten as VMMs come and go, "
                                                         "and at exit; '-' prints it at exit)")
    p.add_argument("--inject-crash-after-faults", type=int, default=0, metavar="N",
                   help="testing: the first serving process kills itself (SIGKILL) after reading N faults of a VMM")


def run(args: argparse.Namespace) -> int:
    from metrics import serve_metrics
    from postcopy.handler import Supervisor, SupervisorOptions, install_signal_handlers
    from postcopy.handler._report import HandlerCollector
    from prometheus_client import CollectorRegistry

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
