"""The loop topology: frames circulate through our switch in both directions, forever.

One DPDK testpmd with two virtio-user ports, one on each of two switch ports, forwards
io-style in pairs (port 0 RX -> port 1 TX, port 1 RX -> port 0 TX) after priming each
port with ``tx_first`` bursts. Two independent loops result (port 0 TX -> switch -> port 1
RX -> port 0 TX, and the mirror image), each holding a fixed population of frames. A loop
only keeps going if no frame is ever lost; a frame is lost for good when testpmd finds a
full transmit ring, and that happened whenever the switch showed a frame to its receiver
before giving its sender the transmit buffer back (the receiver's testpmd forwarded it at
once into a ring still counted as full). Within seconds one direction or both stopped,
without the switch counting a single drop.

The test runs the loop for ``VHOSTUSER_LOOP_SECONDS`` (default 60) with split and packed
rings, event-driven and busy-polling, with each burst engine, and requires: both
directions make progress in every sampling window, testpmd drops nothing on transmit, the
switch drops nothing for any reason, and after stopping the counters add up end to end.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from vhostuser import engine as engines

from .peers import require_peer, wait_for_socket
from .test_net_interop import InteractiveVirtioUser, cpus, port, switch_process, wait_until

pytestmark = pytest.mark.interop

LOOP_SECONDS = float(os.environ.get("VHOSTUSER_LOOP_SECONDS", "60"))
WINDOW = 2.0
"""Seconds per sampling window: each direction must move frames in every one."""
QUEUE = 256
"""virtio-user's default queue size: the most frames a receive ring holds unread."""

_FWD_RE = re.compile(
    r"Forward statistics for port (\d+)\s+-+\s*\n\s*RX-packets:\s*(\d+).*\n"
    r"\s*TX-packets:\s*(\d+)\s+TX-dropped:\s*(\d+)"
)
_NIC_RX_RE = re.compile(r"NIC statistics for port (\d+)\s+#+\s*\n\s*RX-packets:\s*(\d+)")


class LoopTestpmd(InteractiveVirtioUser):
    """testpmd with two virtio-user ports, io forwarding in pairs, driven interactively."""

    __test__ = False

    def __init__(self, sock_a: str, sock_b: str, *, packed: bool, cpu: int) -> None:
        super().__init__(sock_a, packed=packed, forward_mode="io", cpu=cpu)
        self.second = f"net_virtio_user1,path={sock_b},queues=1" + (
            ",packed_vq=1" if packed else "")

    def argv(self) -> list[str]:
        argv = [a for a in super().argv()
                if a not in ("--auto-start",) and not a.startswith("--total-num-mbufs")]
        i = argv.index("--")
        return [*argv[:i], "--vdev", self.second, *argv[i:], "--port-topology=paired",
                "--total-num-mbufs=32768"]

    def rx_totals(self) -> tuple[int, int]:
        """``show port stats all``: RX-packets of port 0 and port 1."""
        mark = self.mark()
        self.send_stdin(b"show port stats all\n")
        self.wait_for(r"NIC statistics for port 1[\s\S]*?Tx-pps:", 15, since=mark)
        got = dict(_NIC_RX_RE.findall(self.log_text()[mark:]))
        return int(got["0"]), int(got["1"])

    def stop_all(self) -> dict[int, tuple[int, int, int]]:
        """``stop``: per port (RX-packets, TX-packets, TX-dropped)."""
        out = self.command("stop", r"^Done\.")
        return {int(m[1]): (int(m[2]), int(m[3]), int(m[4])) for m in _FWD_RE.finditer(out)}


@pytest.mark.parametrize("packed", [False, True], ids=["split", "packed"])
@pytest.mark.parametrize("busy", [False, True], ids=["event", "busy-poll"])
@pytest.mark.parametrize("engine", ["python", "compiled"])
def test_loop_forwards_both_directions_the_whole_time(sock_dir: Path, packed: bool,
                                                      busy: bool, engine: str) -> None:
    require_peer("testpmd")
    if engine == "compiled" and engines.compiled() is None and os.environ.get("CI") != "true":
        pytest.skip("the compiled engine is not built (gcc and python3-dev, then "
                    "bash scripts/setup.sh)")
    cpu = cpus()
    a, b = str(sock_dir / "a.sock"), str(sock_dir / "b.sock")
    sw_cpu = cpu[1] if len(cpu) > 1 else cpu[0]
    with switch_process(sock_dir, f"{a},name=p0", f"{b},name=p1", busy=busy,
                        cpu=sw_cpu, engine=engine) as counters:
        wait_for_socket(a, 20)
        wait_for_socket(b, 20)
        with LoopTestpmd(a, b, packed=packed, cpu=cpu[0]) as pmd:
            pmd.wait_for(r"testpmd> ", 30)
            wait_until(lambda: port(counters(), "p0")["link"] and port(counters(), "p1")["link"],
                       30, "both ports' receive queues")
            pmd.command("start tx_first 8", r"forwards packets", 15)
            time.sleep(1.0)  # the first round
            last = pmd.rx_totals()
            samples: list[tuple[int, int]] = []
            end = time.monotonic() + LOOP_SECONDS
            while time.monotonic() < end:
                time.sleep(WINDOW)
                now = pmd.rx_totals()
                moved = (now[0] - last[0], now[1] - last[1])
                samples.append(moved)
                sw = counters()
                assert moved[0] > 0 and moved[1] > 0, (
                    f"a direction stalled after {len(samples) * WINDOW:.0f} s: frames received "
                    f"in the last {WINDOW} s by port 0 / port 1: {moved}; switch p0 "
                    f"{_brief(port(sw, 'p0'))}, p1 {_brief(port(sw, 'p1'))}")
                last = now
            fwd = pmd.stop_all()
            # The switch drains what testpmd sent before it stopped.
            sw = wait_until(
                lambda: (s := counters())
                and port(s, "p0")["rx_frames"] == fwd[0][1]
                and port(s, "p1")["rx_frames"] == fwd[1][1] and s,
                20, f"the switch to take every frame testpmd sent ({fwd})")
    p0, p1 = port(sw, "p0"), port(sw, "p1")
    rates = [round((x + y) / WINDOW / 1e6, 3) for x, y in samples]
    assert sw["engine"] == engine
    print(f"loop {engine} {'packed' if packed else 'split'} {'busy-poll' if busy else 'event'}: "
          f"{len(samples)} windows, Mpps min {min(rates)} max {max(rates)}; testpmd {fwd}; "
          f"switch p0 {_brief(p0)} p1 {_brief(p1)}")
    for pnum in (0, 1):
        assert fwd[pnum][2] == 0, f"testpmd port {pnum} dropped {fwd[pnum][2]} on transmit"
    for p in (p0, p1):
        assert p["dropped"] == 0, p["drops"]
        assert p["ring_errors"] == 0, p["last_error"]
    # Two ports: whatever enters on one leaves on the other.
    assert p0["rx_frames"] == p1["tx_frames"] and p1["rx_frames"] == p0["tx_frames"]
    # testpmd stopped polling its receive rings: at most a ring's worth sits unread.
    for pnum, p in ((0, p0), (1, p1)):
        unread = p["tx_frames"] - fwd[pnum][0]
        assert 0 <= unread <= QUEUE, (pnum, p["tx_frames"], fwd[pnum])


def _brief(p: dict[str, Any]) -> str:
    return f"rx {p['rx_frames']} tx {p['tx_frames']} dropped {p['dropped']}"
