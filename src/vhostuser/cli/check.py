"""``vhost-user check``: run the conformance suite against someone's back-end command."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from ._common import positive

if TYPE_CHECKING:
    from ..testing.outcome import Result
    from ..testing.registry import Check, Offer

DEFAULT_TIMEOUT = 5.0
"""Seconds any one socket operation may take (as vhostuser.testing.checks)."""

EXAMPLES = """\
examples:
  # DPDK's vhost PMD (testpmd forwards what it receives back: io mode, one port)
  vhost-user check --device net \\
    "dpdk-testpmd --no-pci --no-huge -m 256 --no-shconf --file-prefix vhu-check \\
     --lcores 0@0,1@0 --vdev 'net_vhost0,iface={socket},queues=1' -- --auto-start \\
     --forward-mode=io --nb-cores=1 --total-num-mbufs=16384"

  # qemu-storage-daemon exporting a scratch image (the checks write to it)
  qemu-img create -f raw /tmp/scratch.raw 64M
  vhost-user check --device blk \\
    "qemu-storage-daemon --blockdev driver=file,node-name=f,filename=/tmp/scratch.raw \\
     --export type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path={socket},writable=on"

  # ours
  vhost-user check --device blk "vhost-user blk --image /tmp/scratch.raw --socket {socket}"
  vhost-user check --device net "vhost-user serve --socket {socket}"
  vhost-user check --device net "vhost-user switch --port {socket}" --json > switch.json

  vhost-user check --list --device blk          # the checks, without running anything
  vhost-user check --only HS,RT-02 --device net "..."   # some areas or ids

{socket} is replaced by a socket path in a fresh directory under /tmp; the back-end must
listen there. The command is split as a shell would (no shell runs it); its stdin stays
open (DPDK testpmd quits at EOF) and its output goes to a log in that directory. Every
check gets fresh connections; every socket operation is bounded by --timeout, so a
back-end that hangs fails the check with "timeout" instead of hanging the run. A
back-end process that dies fails the check that killed it and is started again.
The blk checks write to the first few MiB of the disk: give them a scratch image.

Exit status: 0 if every check passed (or was skipped), 1 if any failed, 2 on a usage
error or a back-end that could not be started.
"""


def add_parser(sub: Any) -> None:
    """Register ``check`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "check",
        help="run the conformance checks against a back-end command",
        description=(
            "Start a vhost-user back-end command on a socket and put it through the "
            "conformance checks: handshake and feature words, every per-request rule of the "
            "protocol table, REPLY_ACK, memory table and slots, ring set-up, descriptor "
            "chains, hostile input, reconnection, inflight recovery (blk), dirty logging "
            "(when offered), and fd and process survival. Each check has an id, a one-line "
            "meaning and a reference to the spec; each ends PASS, FAIL with a reason, or "
            "SKIP with a reason."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", nargs="?", metavar="CMD",
                   help="the back-end command line, with {socket} where it must listen")
    p.add_argument("--device", choices=["net", "blk"],
                   help="the device the back-end serves (vhost-user carries no device type)")
    p.add_argument("--json", action="store_true",
                   help="print the results as JSON on stdout (progress goes to stderr)")
    p.add_argument("--only", metavar="IDS",
                   help="comma-separated check ids or areas to run (e.g. HS,RT-02,DESC)")
    p.add_argument("--list", action="store_true",
                   help="list the checks (for --device, if given) and exit")
    p.add_argument("--timeout", type=positive(float), default=DEFAULT_TIMEOUT, metavar="S",
                   help=f"seconds any one socket operation may take (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--start-timeout", type=positive(float), default=30.0, metavar="S",
                   help="seconds the back-end may take to create its socket (default 30)")
    p.add_argument("--workdir", metavar="DIR",
                   help="put the socket and the back-end's log (backend.log) in DIR and keep "
                        "it (default: a fresh directory under /tmp, removed at the end)")
    p.set_defaults(func=run)


def _usage(msg: str) -> int:
    print(f"vhost-user check: {msg}", file=sys.stderr)
    return 2


def _list(checks: list[Check], out: TextIO) -> None:
    """One entry per check: id, devices, meaning, then the spec reference."""
    for c in checks:
        devices = "/".join(sorted(c.devices))
        print(f"{c.id:<9} {devices:<8} {c.meaning}", file=out)
        print(f"{'':<18} [{c.spec}]", file=out)


def _offer_dict(offer: Offer | str, device: str) -> dict[str, Any]:
    if isinstance(offer, str):
        return {"error": offer}
    from ..protocol.enums import DeviceType, feature_names, protocol_feature_names

    dev = DeviceType.NET if device == "net" else DeviceType.BLK
    return {
        "features": offer.features,
        "feature_names": feature_names(offer.features, dev),
        "protocol_features": offer.protocol_features,
        "protocol_feature_names": protocol_feature_names(offer.protocol_features),
        "queue_num": offer.queue_num,
        "max_mem_slots": offer.max_slots,
    }


def run(args: argparse.Namespace) -> int:
    """Run ``vhost-user check``; see the parser's help."""
    # The kit is imported here, not at start-up: the other commands do not need it.
    from ..testing.backend import BackendProcess, BackendStartError, split_command
    from ..testing.checks import probe_offer, run_check, select_checks, summary

    try:
        only = args.only.split(",") if args.only else None
        checks = select_checks(args.device or "net", only)
    except ValueError as e:
        return _usage(str(e))
    if args.list:
        if args.device:
            checks = [c for c in checks if args.device in c.devices]
        _list(checks, sys.stdout)
        return 0
    if not args.command:
        return _usage("give the back-end command (CMD), with {socket} where it must listen")
    if not args.device:
        return _usage("--device net|blk is required (vhost-user carries no device type)")
    try:
        split_command(args.command)
    except ValueError as e:
        return _usage(str(e))
    progress = sys.stderr if args.json else sys.stdout
    backend = BackendProcess(args.command, workdir=args.workdir,
                             start_timeout=args.start_timeout)
    results: list[Result] = []
    started = time.monotonic()
    try:
        try:
            backend.start()
        except BackendStartError as e:
            return _usage(f"the back-end did not start: {e}")
        print(f"back-end: {shlex.join(backend.argv)} (pid {backend.pid})", file=progress)
        print(f"socket:   {backend.socket_path}; log: {backend.log_path}", file=progress)
        offer = probe_offer(backend, args.device, args.timeout)
        if isinstance(offer, str):
            print(f"first handshake failed: {offer}", file=progress)
        else:
            print(f"offer:    features {offer.features:#018x}, protocol features "
                  f"{offer.protocol_features:#x}", file=progress)
        for c in checks:
            r = run_check(c, backend, args.device, timeout=args.timeout, offer=offer)
            results.append(r)
            _progress(c, r, progress)
        counts = summary(results)
        elapsed = time.monotonic() - started
        line = (f"{counts['passed']} passed, {counts['failed']} failed, "
                f"{counts['skipped']} skipped")
        print(f"{line} ({elapsed:.1f} s)", file=progress)
        if args.json:
            by_id = {c.id: c for c in checks}
            doc = {
                "backend": args.command,
                "device": args.device,
                "offer": _offer_dict(offer, args.device),
                "summary": counts,
                "seconds": round(elapsed, 1),
                "results": [{**r.as_dict(), "meaning": by_id[r.check_id].meaning,
                             "spec": by_id[r.check_id].spec} for r in results],
                "backend_restarts": backend.starts - 1,
            }
            json.dump(doc, sys.stdout, indent=2)
            print()
        return 1 if counts["failed"] else 0
    finally:
        if args.workdir:
            backend.stop()
        else:
            backend.close()


def _progress(c: Check, r: Result, out: TextIO) -> None:
    from ..testing.outcome import Outcome

    print(f"{c.id:<9} {r.outcome.value:<4}  {c.meaning}  ({r.seconds:.1f} s)", file=out)
    if r.outcome is not Outcome.PASS and r.reason:
        print(f"{'':<15} {r.reason}", file=out)
    out.flush()
