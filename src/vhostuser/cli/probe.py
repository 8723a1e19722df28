"""``vhost-user probe``: connect to a back-end as a front-end and report what it offers."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import VhostUserError
from ..io.frontend import FrontendClient
from ..protocol.enums import (
    BlkFeature,
    DeviceType,
    ProtocolFeature,
    VirtioFeature,
    feature_names,
    protocol_feature_names,
)
from ..protocol.table import Dialect
from ..virtio.blk import BlkConfig, blk_config_size
from ..virtio.net import NetConfig
from ._common import add_wait, announce_wait, connect_error, positive
from .serve import DRAFT_EXAMPLES, add_draft_options, dialect_of

NET_ONLY_BITS = 0x1FF << 15
"""Bits 15-23: net's MRG_RXBUF, STATUS, CTRL_* , GUEST_ANNOUNCE, MQ, CTRL_MAC_ADDR. Blk
defines only LIFETIME, SECURE_ERASE and ZONED up there, which QEMU-era back-ends do not
offer."""
BLK_HINTS = int(BlkFeature.SEG_MAX | BlkFeature.BLK_SIZE | BlkFeature.FLUSH)


def guess_device(features: int) -> DeviceType | None:
    """Guess net or blk from device-specific feature bits (vhost-user carries no device id).

    Any of bits 15-23 means net; otherwise SEG_MAX, BLK_SIZE or FLUSH means blk; else None.
    The bits overlap between device types, so pass ``--device`` when it matters.
    """
    if features & NET_ONLY_BITS:
        return DeviceType.NET
    if features & BLK_HINTS:
        return DeviceType.BLK
    return None


def probe(path: str, *, device: str = "auto", timeout: float = 5.0,
          connect_timeout: float = 5.0, dialect: Dialect = Dialect.CURRENT) -> dict[str, Any]:
    """Connect to the back-end at ``path``, negotiate, read what it offers, disconnect.

    Raises:
        VhostUserError: the back-end broke the protocol, timed out or closed.
        OSError: the socket could not be reached.
    """
    with FrontendClient.connect(path, timeout=timeout, connect_timeout=connect_timeout,
                                dialect=dialect) as c:
        return probe_client(c, path, device=device)


def probe_client(c: FrontendClient, path: str, *, device: str = "auto") -> dict[str, Any]:
    """Negotiate over an open client and read what the back-end offers (see :func:`probe`).

    Raises:
        VhostUserError: the back-end broke the protocol, timed out or closed.
    """
    n = c.negotiate(set_features=False, backend_channel=False)
    dev: DeviceType | None
    if device == "auto":
        dev = guess_device(n.backend_features)
    else:
        dev = {"net": DeviceType.NET, "blk": DeviceType.BLK, "none": None}[device]
    result: dict[str, Any] = {
        "socket": path,
        "device": dev.name.lower() if dev is not None else "unknown",
        "features": n.backend_features,
        "feature_names": feature_names(n.backend_features, dev),
        "protocol_features": n.backend_protocol_features,
        "protocol_feature_names": protocol_feature_names(n.backend_protocol_features),
        "queue_num": n.queue_num,
        "max_mem_slots": n.max_mem_slots,
        "config": None,
        "dialect": c.dialect.value,
        "echoes": c.echoes,
        "migration": _migration(n.backend_features, n.backend_protocol_features),
    }
    if c.conn.has(ProtocolFeature.CONFIG) and dev is not None:
        size = blk_config_size(n.backend_features) if dev is DeviceType.BLK else 12
        raw = c.get_config(0, size)
        cfg: dict[str, Any] = {"raw": raw.hex()}
        if dev is DeviceType.BLK:
            b = BlkConfig.decode(raw)
            cfg.update({k: getattr(b, k) for k in b.__dataclass_fields__})
            cfg["capacity_bytes"] = b.capacity_bytes
        else:
            nc = NetConfig.decode(raw)
            cfg.update({k: getattr(nc, k) for k in nc.__dataclass_fields__})
        result["config"] = cfg
    return result


def _migration(features: int, protocol_features: int) -> dict[str, bool]:
    """What a front-end migrating a guest can use: a dirty log (VHOST_F_LOG_ALL offered
    and LOG_SHMFD, without which QEMU refuses to migrate), the back-end's own state
    (DEVICE_STATE), in-band notifications."""
    pf = protocol_features if features & VirtioFeature.PROTOCOL_FEATURES else 0
    return {
        "dirty_log": bool(features & VirtioFeature.LOG_ALL and pf & ProtocolFeature.LOG_SHMFD),
        "device_state": bool(pf & ProtocolFeature.DEVICE_STATE),
        "inband_notifications": bool(pf & ProtocolFeature.INBAND_NOTIFICATIONS),
    }


def _print_text(r: dict[str, Any]) -> None:
    dialect = Dialect(r["dialect"])
    print(f"back-end:           {r['socket']}")
    if dialect.is_draft:
        print(f"dialect:            {dialect.description}")
        print(f"ECHO:               answered ({r['echoes']})")
    print(f"device (guessed):   {r['device']}")
    print(f"virtio features:    {r['features']:#018x}")
    for name in r["feature_names"]:
        print(f"    {name}")
    if dialect.is_draft:
        print("protocol features:  (none: the 2014 draft has none)")
    elif r["features"] & VirtioFeature.PROTOCOL_FEATURES:
        print(f"protocol features:  {r['protocol_features']:#x}")
        for name in r["protocol_feature_names"]:
            print(f"    {name}")
    else:
        print("protocol features:  (none: VHOST_USER_F_PROTOCOL_FEATURES not offered)")
    qn = r["queue_num"]
    print(f"queues:             {qn if qn is not None else 'not reported (no MQ)'}")
    ms = r["max_mem_slots"]
    print(f"max memory slots:   {ms if ms is not None else 'not reported (8, SET_MEM_TABLE)'}")
    mig = r["migration"]
    if not dialect.is_draft:
        log = ("dirty log (LOG_ALL, LOG_SHMFD)" if mig["dirty_log"]
               else "no dirty log (needs LOG_ALL and LOG_SHMFD)")
        extra = [name for key, name in (("device_state", "DEVICE_STATE"),
                                         ("inband_notifications", "INBAND_NOTIFICATIONS"))
                 if mig[key]]
        print(f"migration:          {', '.join([log, *extra])}")
    cfg = r["config"]
    if cfg is None:
        print("config space:       not available (no CONFIG protocol feature or unknown device)")
    else:
        print(f"config space:       {cfg['raw']}")
        for k, v in cfg.items():
            if k != "raw" and v is not None:
                print(f"    {k}: {v}")


def add_parser(sub: Any) -> None:
    """Register ``probe`` on the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "probe",
        help="connect to a back-end and print what it offers",
        description=(
            "Connect to a vhost-user back-end as a front-end (the role QEMU plays), run the "
            "feature negotiation, and print its virtio features and protocol features by "
            "name, its queue count, its max memory slots and its config space (decoded for "
            "net and blk), then disconnect cleanly. Nothing is set up: no memory, no rings."
        ),
        epilog=(
            "examples:\n"
            "  vhost-user probe /tmp/vhost-blk.sock\n"
            "  vhost-user probe --json /tmp/vhost-net.sock | jq .protocol_feature_names\n"
            "  # stay connected; say when the back-end dies (ECHO every 2.5 s with --draft)\n"
            "  vhost-user probe --draft --watch 2.5 /tmp/draft.sock\n"
            "vhost-user carries no device type; --device auto guesses net or blk from the\n"
            "feature bits. Exit status: 0 on success, 2 if the back-end misbehaved or\n"
            "could not be reached, 1 if --watch saw it die, 130 on Ctrl-C.\n\n"
            + DRAFT_EXAMPLES
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("socket", help="path of the back-end's listening AF_UNIX socket")
    p.add_argument("--json", action="store_true", help="print JSON (raw integers included)")
    p.add_argument("--device", choices=["auto", "net", "blk", "none"], default="auto",
                   help="how to name device bits and decode config (default: auto)")
    p.add_argument("--timeout", type=positive(float), default=5.0, metavar="S",
                   help="seconds to wait for each reply (default 5)")
    p.add_argument("--watch", type=positive(float), default=None, metavar="SECONDS",
                   help="after probing, stay connected and check the back-end every SECONDS "
                        "until it dies: socket HUP, and with --draft an ECHO that must come "
                        "back within --timeout (the draft's liveness probe)")
    add_draft_options(p)
    add_wait(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Entry point of ``vhost-user probe``."""
    announce_wait("probe", args.socket, args.wait)
    client: FrontendClient | None = None
    try:
        client = FrontendClient.connect(args.socket, timeout=args.timeout,
                                        connect_timeout=args.wait, dialect=dialect_of(args))
        r = probe_client(client, args.socket, device=args.device)
        if args.json:
            print(json.dumps(r, indent=2), flush=True)
        else:
            _print_text(r)
        if args.watch is None:
            return 0
        what = "socket HUP" + (f", ECHO every {args.watch:g} s answered within "
                               f"{args.timeout:g} s" if client.dialect.is_draft else "")
        print(f"vhost-user probe: watching {args.socket} ({what}); Ctrl-C to stop",
              file=sys.stderr, flush=True)
        why = client.watch(args.watch, timeout=args.timeout)
        print(f"vhost-user probe: back-end gone: {why}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"vhost-user probe: interrupted ({args.socket})", file=sys.stderr)
        return 130
    except (VhostUserError, OSError, ValueError) as e:
        print(f"vhost-user probe: {connect_error(args.socket, e)}", file=sys.stderr)
        return 2
    finally:
        if client is not None:
            client.close()
