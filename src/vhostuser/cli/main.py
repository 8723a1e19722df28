"""``vhost-user``: the command line of vhostuser."""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from . import blk, blkbench, check, demo, pktgen, probe, serve, trace
from . import switch as switch_cmd


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    p = argparse.ArgumentParser(
        prog="vhost-user",
        description=(
            "vhost-user in pure Python: run back-ends that QEMU and DPDK drive, and drive "
            "any back-end (DPDK vhost, qemu-storage-daemon, virtiofsd, ours) without a VM."
        ),
        epilog="Run 'vhost-user COMMAND --help' for each command's options and examples.",
    )
    p.add_argument("--version", action="version", version=f"vhost-user {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    probe.add_parser(sub)
    serve.add_parser(sub)
    switch_cmd.add_parser(sub)
    pktgen.add_parser(sub)
    blk.add_parser(sub)
    blkbench.add_parser(sub)
    trace.add_parser(sub)
    check.add_parser(sub)
    demo.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        # Ctrl-C where a command had nothing better to do with it: one line, no traceback.
        print(f"vhost-user {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which exited: not an error of ours.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
