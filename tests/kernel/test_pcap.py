"""pcap capture files: what tcpdump reads back, and a writer that falls behind drops (and
counts) instead of holding up the data path."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vhostuser.io.pcap import PcapWriter, read_pcap


def _frames(n: int, size: int = 60) -> list[bytes]:
    return [bytes.fromhex("02000000000b02000000000a0800") + i.to_bytes(4, "big")
            + bytes(size - 18) for i in range(n)]


def test_frames_come_back_in_order_with_their_times(tmp_path: Path) -> None:
    path = tmp_path / "p.pcap"
    w = PcapWriter(path, snaplen=40)
    frames = [*_frames(100), bytes(1500)]
    for i, f in enumerate(frames):
        w.capture(memoryview(f), when=1000.0 + i / 1000)
    w.close()
    w.close()  # idempotent
    got = read_pcap(path)
    assert [d for _t, d in got] == [f[:40] for f in frames]  # cut at snaplen
    assert got[3][0] == pytest.approx(1000.003, abs=2e-6)
    assert w.counters() == {"file": str(path), "captured": 101, "dropped": 0, "written": 101}


def test_tcpdump_reads_it(tmp_path: Path) -> None:
    if shutil.which("tcpdump") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tcpdump is missing in CI (scripts/install-peers.sh installs it)")
        pytest.skip("tcpdump is not installed: apt-get install tcpdump "
                    "(or bash scripts/install-peers.sh)")
    path = tmp_path / "p.pcap"
    w = PcapWriter(path)
    for f in _frames(25):
        w.capture(f)
    w.close()
    r = subprocess.run(["tcpdump", "-nn", "-e", "-r", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 25, r.stdout
    assert "02:00:00:00:00:0a > 02:00:00:00:00:0b" in lines[0], lines[0]


def test_a_writer_that_falls_behind_drops_and_counts(tmp_path: Path) -> None:
    w = PcapWriter(tmp_path / "p.pcap", queue_frames=4)
    offered = 20000
    for f in _frames(offered):
        w.capture(f)  # never blocks
    w.close()
    c = w.counters()
    assert c["captured"] + c["dropped"] == offered
    assert c["dropped"] > 0 and c["written"] == c["captured"]
    assert len(read_pcap(tmp_path / "p.pcap")) == c["captured"]


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="snaplen 0"):
        PcapWriter(tmp_path / "p.pcap", snaplen=0)
    with pytest.raises(FileNotFoundError):
        PcapWriter(tmp_path / "missing" / "p.pcap")
    (tmp_path / "junk").write_bytes(b"not a pcap")
    with pytest.raises(ValueError, match="not a pcap file"):
        read_pcap(tmp_path / "junk")
