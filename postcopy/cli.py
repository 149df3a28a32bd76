"""The ``postcopy`` command line: one subcommand per module that owns it.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
Errors reach the user as one sentence, not a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("postcopy.commands.demo", "migrate the built-in guest between two processes on loopback"),
    "source": ("postcopy.commands.source", "run the source role: migrate a guest to a destination"),
    "dest": ("postcopy.commands.dest", "run the destination role: receive a guest and serve its page faults"),
    "report": ("postcopy.commands.report", "summarise a run's JSON report and plot its fault latencies and timeline"),
    "uffd-handler": ("postcopy.commands.uffd_handler",
                     "serve the page faults of VMMs that hand over their userfaultfd (Firecracker's handshake)"),
    "inspect": ("postcopy.inspect", "decode a recorded migration stream and print its structure"),
}


class UserError(Exception):
    """An error whose message is meant for the user, printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="postcopy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.run(args))
    except UserError as exc:
        print(f"postcopy {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
