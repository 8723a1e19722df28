"""The switch's capture: every port's frames, both directions, in pcap files whose frame
counts equal the switch's counters; a capture that falls behind drops and counts, and
forwarding goes on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from vhostuser.frontends.net import VirtioNetFrontend
from vhostuser.io.pcap import read_pcap
from vhostuser.switch import Switch, SwitchThread

from .test_net_switch import MAC_A, MAC_B, frames_seq, receive_n, wait_until

MAC_C = bytes.fromhex("02000000000c")


def test_every_port_both_directions(no_leaks: Any, tmp_path: Path) -> None:
    a, b, c = (str(tmp_path / f"{n}.sock") for n in "abc")
    cap = tmp_path / "cap"
    cap.mkdir()

    def setup(sw: Switch) -> None:
        sw.start_capture(str(cap))
        for path, name in ((a, "a"), (b, "b"), (c, "c")):
            sw.add_vhost_user_port(path, name=name)

    with SwitchThread(setup, engine="auto") as st, VirtioNetFrontend.connect(a) as na, \
            VirtioNetFrontend.connect(b) as nb, VirtioNetFrontend.connect(c) as nc:
        to_b = frames_seq(40, 64, MAC_A, MAC_B)  # flooded to b and c (b is not known yet)
        na.send_all(to_b)
        assert receive_n(nb, 40) == to_b
        assert len(receive_n(nc, 40)) == 40
        back = frames_seq(30, 1000, MAC_B, MAC_A)  # unicast now
        nb.send_all(back)
        assert receive_n(na, 30) == back
        stats = st.stats()
        st.call(lambda: st.switch.stop_capture())  # type: ignore[union-attr]
        assert not st.errors
    ports = {p["name"]: p for p in stats["ports"]}
    for name in "abc":
        frames = read_pcap(cap / f"{name}.pcap")
        p = ports[name]
        assert len(frames) == p["rx_frames"] + p["tx_frames"], (name, p)
        assert p["capture"]["captured"] == len(frames) and p["capture"]["dropped"] == 0
    a_frames = [d for _t, d in read_pcap(cap / "a.pcap")]
    assert a_frames == to_b + back  # what a sent, then what it was sent, in order
    assert [d for _t, d in read_pcap(cap / "c.pcap")] == to_b  # the flood


def test_tcpdump_reads_the_switch_capture(no_leaks: Any, tmp_path: Path) -> None:
    if shutil.which("tcpdump") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("tcpdump is missing in CI (scripts/install-peers.sh installs it)")
        pytest.skip("tcpdump is not installed: apt-get install tcpdump")
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")

    def setup(sw: Switch) -> None:
        sw.add_vhost_user_port(a, name="a")
        sw.add_vhost_user_port(b, name="b")
        sw.start_capture(str(tmp_path), snaplen=96)

    with SwitchThread(setup) as st, VirtioNetFrontend.connect(a) as na, \
            VirtioNetFrontend.connect(b) as nb:
        na.send_all(frames_seq(25, 1400, MAC_A, MAC_B))
        assert len(receive_n(nb, 25)) == 25
        st.call(lambda: st.switch.stop_capture())  # type: ignore[union-attr]
    r = subprocess.run(["tcpdump", "-nn", "-e", "-r", str(tmp_path / "b.pcap")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 25, r.stdout
    assert "02:00:00:00:00:0a > 02:00:00:00:00:0b" in r.stdout


def test_capture_into_a_missing_directory_is_refused(tmp_path: Path) -> None:
    with SwitchThread() as st:
        with pytest.raises(FileNotFoundError, match="no such directory for pcap files"):
            st.call(lambda: st.switch.start_capture(str(tmp_path / "nope")))  # type: ignore[union-attr]
        assert st.call(lambda: st.switch.stop_capture()) == {}  # type: ignore[union-attr]


def _cli(*args: str) -> subprocess.Popen[str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    return subprocess.Popen([sys.executable, "-m", "vhostuser.cli.main", "switch", *args],
                            env=dict(os.environ, PYTHONPATH=src), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_switch_command_pcap(no_leaks: Any, tmp_path: Path) -> None:
    a, b = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    cap = tmp_path / "cap"
    cap.mkdir()
    p = _cli("--port", f"{a},name=vm1", "--port", f"{b},name=vm2", "--pcap", str(cap),
             "--snaplen", "128")
    try:
        wait_until(lambda: os.path.exists(b) or p.poll() is not None, 20, "sockets")
        with VirtioNetFrontend.connect(a) as na, VirtioNetFrontend.connect(b) as nb:
            na.send_all(frames_seq(33, 1000, MAC_A, MAC_B))
            assert len(receive_n(nb, 33)) == 33
        p.terminate()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert f"{cap}/vm2.pcap: 33 frames captured" in out, out
    frames = read_pcap(cap / "vm1.pcap")
    assert len(frames) == 33 and all(len(d) == 128 for _t, d in frames)


def test_switch_command_pcap_into_a_missing_directory(tmp_path: Path) -> None:
    p = _cli("--port", str(tmp_path / "a.sock"), "--pcap", str(tmp_path / "nope"))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2, (out, err)
    assert f"--pcap {tmp_path / 'nope'}: no such directory for pcap files" in err, err
    assert "Traceback" not in err and not (tmp_path / "a.sock").exists()


def test_pktgen_pcap_holds_what_it_sent_and_received(no_leaks: Any, tmp_path: Path) -> None:
    echo, pcap = str(tmp_path / "e.sock"), tmp_path / "pk.pcap"
    src = str(Path(__file__).resolve().parents[2] / "src")
    env = dict(os.environ, PYTHONPATH=src)
    sw = _cli("--echo", echo, "--quiet")
    try:
        wait_until(lambda: os.path.exists(echo) or sw.poll() is not None, 20, "echo port")
        r = subprocess.run([sys.executable, "-m", "vhostuser.cli.main", "pktgen", echo,
                            "--count", "200", "--quiet", "--json", "--pcap", str(pcap)],
                           env=env, text=True, capture_output=True, timeout=120)
    finally:
        sw.terminate()
        sw.communicate(timeout=30)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["capture"]["written"] == 400 and summary["capture"]["dropped"] == 0
    frames = [d for _t, d in read_pcap(pcap)]
    assert len(frames) == 400 and frames.count(frames[0]) >= 2  # each frame, and its echo
