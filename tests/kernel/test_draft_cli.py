"""``--draft`` / ``--draft-numbering`` on serve, switch and probe, as processes: the two
sides agree in either numbering; with the dialects crossed, both sides say once that the
peer looks like it speaks the other one; ``probe --watch`` reports a back-end that hangs
up, and (draft) one that stops answering ECHO.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HINT = "looks like it speaks another dialect"


def _run(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vhostuser.cli.main", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def _start(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "vhostuser.cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _stop(p: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGINT (as Ctrl-C), then the output."""
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    return out, err


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    import shutil
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="vhu-dc-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _probe(sock: str, *flags: str) -> subprocess.CompletedProcess[str]:
    """probe, waiting for the back-end to listen; stderr without the line saying so."""
    r = _run("probe", *flags, "--wait", "30", sock)
    waiting = f"vhost-user probe: waiting up to 30 s for a back-end on {sock}\n"
    assert r.stderr.startswith(waiting), r.stderr
    r.stderr = r.stderr[len(waiting):]
    return r


@pytest.mark.parametrize("flags", [["--draft"], ["--draft-numbering", "text"],
                                   ["--draft-numbering", "code"]])
def test_serve_and_probe_agree_in_the_draft(sock_dir: Path, flags: list[str]) -> None:
    sock = str(sock_dir / "be.sock")
    srv = _start("serve", "--socket", sock, *flags)
    try:
        r = _probe(sock, *flags)
        assert r.returncode == 0, r.stderr
        assert "dialect:            the 2014 draft numbered as its " \
            f"{'code' if 'code' in flags else 'text'}" in r.stdout
        assert "ECHO:               answered (1)" in r.stdout
        assert "MRG_RXBUF" in r.stdout and "VERSION_1" not in r.stdout
        assert "protocol features:  (none: the 2014 draft has none)" in r.stdout
        assert r.stderr == ""
    finally:
        out, err = _stop(srv)
    assert "speaking the 2014 draft" in out
    assert HINT not in err, err


def test_probe_json_names_the_dialect(sock_dir: Path) -> None:
    import json

    sock = str(sock_dir / "be.sock")
    srv = _start("serve", "--socket", sock, "--draft-numbering", "code")
    try:
        r = _probe(sock, "--json", "--draft-numbering", "code")
        assert r.returncode == 0, r.stderr
        got = json.loads(r.stdout)
        assert got["dialect"] == "draft-code" and got["echoes"] == 1
        assert got["protocol_features"] == 0
    finally:
        _stop(srv)


@pytest.mark.parametrize(("serve_flags", "probe_flags", "probe_says", "serve_says"), [
    # current probe vs text-numbered serve: GET_FEATURES comes back as an empty ECHO
    (["--draft"], [], "--draft)", "may speak another dialect"),
    # code-numbered probe vs current serve: its ECHO (16) is SET_PROTOCOL_FEATURES
    ([], ["--draft-numbering", "code"], "no --draft)", "--draft-numbering code)"),
    # text-numbered probe vs current serve: its ECHO (1) gets the features back
    ([], ["--draft"], "no --draft)", None),
    # text-numbered probe vs code-numbered serve
    (["--draft-numbering", "code"], ["--draft"], "--draft-numbering code)", None),
])
def test_crossed_dialects_are_named_once_on_each_side(
        sock_dir: Path, serve_flags: list[str], probe_flags: list[str], probe_says: str,
        serve_says: str | None) -> None:
    sock = str(sock_dir / "be.sock")
    srv = _start("serve", "--socket", sock, *serve_flags)
    try:
        r = _probe(sock, *probe_flags)
    finally:
        _out, err = _stop(srv)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2, r.stderr  # the hint, then the error
    assert HINT in lines[0] and probe_says in lines[0]
    assert lines[1].startswith("vhost-user probe: ")
    if serve_says is None:
        assert "another dialect" not in err  # it only saw a peer leave early
    else:
        hints = [line for line in err.splitlines() if "another dialect" in line]
        assert len(hints) == 1 and serve_says in hints[0], err


@pytest.mark.parametrize("flags", [["--draft"], ["--draft-numbering", "code"]])
def test_switch_ports_speak_the_draft(sock_dir: Path, flags: list[str]) -> None:
    a, e = str(sock_dir / "a.sock"), str(sock_dir / "e.sock")
    sw = _start("switch", "--port", a, "--echo", e, "-q", *flags)
    try:
        for sock in (a, e):
            r = _probe(sock, *flags)
            assert r.returncode == 0, r.stderr
            assert "ECHO:               answered (1)" in r.stdout
        r = _probe(a)  # the current protocol against a draft port
        if "code" in flags:
            # GET_FEATURES and SET_OWNER are ids 1 and 3 in both: nothing went wrong
            assert r.returncode == 0 and r.stderr == "", r.stderr
        else:
            assert r.returncode == 2 and HINT in r.stderr
    finally:
        out, _err = _stop(sw)
    assert "vhost-user ports speak the 2014 draft" in out


def _watching(p: subprocess.Popen[str]) -> str:
    """Read probe's stderr until it says it is watching; return that line."""
    assert p.stderr is not None
    for line in p.stderr:
        if "watching" in line:
            return line
        assert "waiting up to" in line, line
    raise AssertionError("probe ended without watching")


def test_watch_reports_a_back_end_that_hangs_up(sock_dir: Path) -> None:
    sock = str(sock_dir / "be.sock")
    srv = _start("serve", "--socket", sock, "--draft")
    watcher = _start("probe", "--draft", "--watch", "0.1", "--wait", "30", sock)
    try:
        line = _watching(watcher)
        assert "ECHO every 0.1 s" in line
        _stop(srv)
        out, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 1, err
        assert "vhost-user probe: back-end gone: the back-end closed the connection" in err
        assert "ECHO:               answered" in out
    finally:
        for p in (srv, watcher):
            if p.poll() is None:
                p.kill()
                p.communicate()


def test_watch_declares_dead_a_back_end_that_stops_answering_echo(sock_dir: Path) -> None:
    sock = str(sock_dir / "be.sock")
    srv = _start("serve", "--socket", sock, "--draft-numbering", "code")
    watcher = _start("probe", "--draft-numbering", "code", "--watch", "0.1", "--timeout", "0.5",
                     "--wait", "30", sock)
    try:
        _watching(watcher)
        os.kill(srv.pid, signal.SIGSTOP)  # alive (the socket stays open) but silent
        _out, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 1, err
        assert "vhost-user probe: back-end gone: no ECHO reply within 0.5 s" in err
    finally:
        os.kill(srv.pid, signal.SIGCONT)
        _stop(srv)
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()


def test_watch_in_the_current_protocol_and_ctrl_c(sock_dir: Path) -> None:
    sock = str(sock_dir / "be.sock")
    srv = _start("serve", "--socket", sock)
    watcher = _start("probe", "--watch", "0.1", "--wait", "30", sock)
    try:
        line = _watching(watcher)
        assert "socket HUP)" in line and "ECHO" not in line
        watcher.send_signal(signal.SIGINT)
        _out, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 130, err
        assert "Traceback" not in err
    finally:
        _stop(srv)


@pytest.mark.parametrize("cmd", ["serve", "probe", "switch"])
def test_help_shows_the_draft_options_with_an_example(cmd: str) -> None:
    r = _run(cmd, "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "--draft " in text and "--draft-numbering {text,code}" in text
    assert "ECHO = 16" in text and "ECHO = 1" in text
    assert "probe --draft /tmp/" in text


def test_bad_numbering_is_one_line_naming_the_flag() -> None:
    r = _run("serve", "--socket", "/tmp/x.sock", "--draft-numbering", "qemu")
    assert r.returncode == 2
    assert "--draft-numbering: invalid choice: 'qemu'" in r.stderr
