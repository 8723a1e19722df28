"""``vhost-user check`` against our own back-ends, and against broken ones.

Ours (``serve``, ``switch --port``, ``blk``) pass every check or skip it with a reason.
The kit is also shown to be sensitive: a back-end built on our core with one rule broken
(a gate lifted, a reply never sent, a crash on one message) fails exactly the checks
about that rule, a back-end that accepts connections and never answers fails every check
it is put through, and no run hangs (each socket operation is bounded by ``--timeout``).
Finally the pytest plugin runs the same checks as tests (``pytest --pyargs
vhostuser.testing``) and its fixtures drive a back-end.

The runs are subprocesses with generous limits: a limit here guards against a hang, it
does not measure speed.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.check_scores import record_score

HANG_GUARD = 900.0
"""Seconds after which a run counts as hung (a full run takes well under a minute)."""

PY = shlex.quote(sys.executable)
OURS = f"{PY} -m vhostuser.cli.main"


def _check(*args: str, guard: float = HANG_GUARD) -> tuple[int, dict[str, Any], str]:
    """Run ``vhost-user check ... --json``; return (status, the JSON document, stderr)."""
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.main", "check", "--json", *args],
                       capture_output=True, text=True, timeout=guard, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    try:
        doc = json.loads(r.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"no JSON (status {r.returncode}):\n{r.stdout}\n{r.stderr}") from None
    return r.returncode, doc, r.stderr




def _by_id(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in doc["results"]}


def _assert_all_pass(doc: dict[str, Any], stderr: str) -> None:
    bad = [r for r in doc["results"] if r["outcome"] == "FAIL"]
    assert not bad, "\n".join(f"{r['id']}: {r['reason']}" for r in bad) + "\n" + stderr
    for r in doc["results"]:
        if r["outcome"] == "SKIP":
            assert r["reason"], f"{r['id']} skipped without a reason"
    assert doc["summary"]["failed"] == 0
    assert doc["summary"]["passed"] >= 40, doc["summary"]


# -- ours ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "device", "command"), [
    ("serve", "net", f"{OURS} serve --socket {{socket}}"),
    ("switch", "net", f"{OURS} switch --port {{socket}}"),
])
def test_our_net_backends_pass(name: str, device: str, command: str) -> None:
    status, doc, err = _check(command, "--device", device)
    _assert_all_pass(doc, err)
    assert status == 0
    record_score(f"ours-{name}", command.replace(OURS, "vhost-user"), doc)
    assert len(doc["results"]) >= 30
    assert "passed" in err and "failed" in err and "skipped" in err


def test_our_blk_backend_passes(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    command = f"{OURS} blk --image {shlex.quote(str(image))} --socket {{socket}}"
    status, doc, err = _check(command, "--device", "blk")
    _assert_all_pass(doc, err)
    assert status == 0
    record_score("ours-blk", "vhost-user blk --image IMG --socket {socket}", doc)
    got = _by_id(doc)
    for cid in ("IF-01", "IF-02", "IF-03", "BLK-01", "BLK-05", "RC-02"):
        assert got[cid]["outcome"] == "PASS", got[cid]


# -- a broken back-end: one rule violated --------------------------------------------------------

BROKEN = textwrap.dedent('''
    """Our serve back-end with one rule broken (argv: MODE SOCKET)."""
    import dataclasses
    import os
    import sys

    from vhostuser.protocol import payloads as P
    from vhostuser.protocol import table
    from vhostuser.protocol.enums import FrontendRequest as R

    mode, path = sys.argv[1], sys.argv[2]
    if mode == "gate":
        # GET_QUEUE_NUM answered even when MQ was not negotiated.
        rule = table.FRONTEND_RULES[R.GET_QUEUE_NUM]
        table.FRONTEND_RULES[R.GET_QUEUE_NUM] = dataclasses.replace(rule, gate=None)
    elif mode == "hang":
        # GET_VRING_BASE is never answered.
        from vhostuser.connection import backend as cb

        reply = cb.BackendConnection._reply

        def _reply(self, request, *args, **kwargs):
            if request == R.GET_VRING_BASE:
                return None
            return reply(self, request, *args, **kwargs)

        cb.BackendConnection._reply = _reply
    elif mode == "crash":
        # A ring state with num 3 (only a bad SET_VRING_NUM carries it) kills the process.
        decode = P.VringState.decode.__func__

        def _decode(cls, data):
            state = decode(cls, data)
            if state.num == 3:
                os.abort()
            return state

        P.VringState.decode = classmethod(_decode)
    elif mode == "nolog":
        # Dirty bits go to a private copy of the log, not the front-end's.
        from vhostuser import memory

        init = memory.DirtyLog.__init__

        def _init(self, buf, **kw):
            init(self, bytearray(len(buf)), **kw)

        memory.DirtyLog.__init__ = _init
    elif mode == "base":
        # GET_VRING_BASE answers one less than where the ring stopped.
        encode = P.VringState.encode

        def _encode(self):
            return encode(dataclasses.replace(self, num=(self.num - 1) & 0xFFFF))

        P.VringState.encode = _encode
    else:
        raise SystemExit(f"unknown mode {mode}")

    from vhostuser.cli.main import main

    sys.exit(main(["serve", "--socket", path]))
''')

SILENT = textwrap.dedent('''
    """Accept every connection, read nothing, answer nothing (argv: SOCKET)."""
    import socket
    import sys

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[1])
    listener.listen(64)
    held = []
    while True:
        conn, _ = listener.accept()
        held.append(conn)
''')


@pytest.fixture
def broken(tmp_path: Path) -> str:
    script = tmp_path / "broken_backend.py"
    script.write_text(BROKEN)
    return f"{PY} {shlex.quote(str(script))}"


def test_lifted_gate_fails_the_gate_check_only(broken: str) -> None:
    status, doc, _err = _check(f"{broken} gate {{socket}}", "--device", "net",
                              "--only", "HS,ACK,RT")
    got = _by_id(doc)
    assert got["RT-04"]["outcome"] == "FAIL", got["RT-04"]
    assert "GET_QUEUE_NUM without MQ" in got["RT-04"]["reason"]
    others = [r for r in doc["results"] if r["outcome"] == "FAIL" and r["id"] != "RT-04"]
    assert not others, others
    assert status == 1


def test_unanswered_get_vring_base_fails_with_timeout(broken: str) -> None:
    status, doc, _err = _check(f"{broken} hang {{socket}}", "--device", "net",
                              "--only", "HS-01,RING-01,RING-03,NET-01", "--timeout", "1")
    got = _by_id(doc)
    for cid in ("RING-01", "RING-03"):
        assert got[cid]["outcome"] == "FAIL", got[cid]
        assert "timeout" in got[cid]["reason"], got[cid]
    for cid in ("HS-01", "NET-01"):
        assert got[cid]["outcome"] == "PASS", got[cid]
    assert status == 1


def test_unlogged_writes_and_a_wrong_base_fail_the_migration_checks(broken: str) -> None:
    status, doc, _err = _check(f"{broken} nolog {{socket}}", "--device", "net",
                              "--only", "DL,MIG")
    got = _by_id(doc)
    assert got["MIG-01"]["outcome"] == "FAIL", got["MIG-01"]
    assert "not marked in the log" in got["MIG-01"]["reason"], got["MIG-01"]
    assert got["MIG-02"]["outcome"] == "PASS", got["MIG-02"]
    assert status == 1
    status, doc, _err = _check(f"{broken} base {{socket}}", "--device", "net",
                              "--only", "DL,MIG")
    got = _by_id(doc)
    assert got["MIG-02"]["outcome"] == "FAIL", got["MIG-02"]
    assert got["MIG-01"]["outcome"] == "PASS", got["MIG-01"]
    assert status == 1


def test_crash_is_reported_by_id_and_the_backend_restarted(broken: str) -> None:
    status, doc, _err = _check(f"{broken} crash {{socket}}", "--device", "net",
                              "--only", "RING-09,RING-01,NET-01")
    got = _by_id(doc)
    reason = got["RING-09"]["reason"]
    assert got["RING-09"]["outcome"] == "FAIL", got["RING-09"]
    assert "killed by SIGABRT" in reason and "SET_VRING_NUM 3" in reason, reason
    assert got["RING-01"]["outcome"] == "PASS", got["RING-01"]
    assert got["NET-01"]["outcome"] == "PASS", got["NET-01"]
    assert doc["backend_restarts"] >= 1
    assert status == 1


def test_backend_that_never_answers_fails_everything_without_hanging(tmp_path: Path) -> None:
    script = tmp_path / "silent.py"
    script.write_text(SILENT)
    status, doc, err = _check(f"{PY} {shlex.quote(str(script))} {{socket}}", "--device", "net",
                              "--timeout", "0.5")
    assert status == 1
    outcomes = {r["outcome"] for r in doc["results"]}
    assert "PASS" not in outcomes, [r for r in doc["results"] if r["outcome"] == "PASS"]
    failed = [r for r in doc["results"] if r["outcome"] == "FAIL"]
    assert len(failed) >= 30
    assert all(r["reason"] for r in failed)
    assert "first handshake failed" in err


# -- usage -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "expect"), [
    (["serve --socket /tmp/x", "--device", "net"], "placeholder"),
    (["vhost-user serve --socket {socket}"], "--device net|blk is required"),
    (["x {socket}", "--device", "net", "--only", "NOPE"], "no check or area named NOPE"),
    (["/nonexistent/backend {socket}", "--device", "net"], "did not start"),
])
def test_usage_errors_exit_2_in_one_line(args: list[str], expect: str) -> None:
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.main", "check", *args],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    assert expect in r.stderr, r.stderr


def test_list_names_every_check_with_its_spec() -> None:
    r = subprocess.run([sys.executable, "-m", "vhostuser.cli.main", "check", "--list"],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr
    ids = [line.split()[0] for line in r.stdout.splitlines() if line and not line[0].isspace()]
    assert len(ids) == len(set(ids)) >= 30
    areas = {i.split("-")[0] for i in ids}
    assert areas >= {"HS", "ACK", "RT", "MEM", "RING", "DESC", "NET", "BLK", "IF", "DL", "RC",
                     "SURV", "HOS"}
    assert r.stdout.count("[") >= len(ids)


# -- the pytest plugin ----------------------------------------------------------------------------

PLUGIN_USER = textwrap.dedent('''
    """A project's own tests using the plugin's fixtures."""
    from vhostuser.io.guestram import GuestRam


    def test_frontend(vhost_frontend):
        n = vhost_frontend.negotiate()
        assert n.backend_features


    def test_ram(guest_ram: GuestRam):
        assert guest_ram.size == 16 << 20


    def test_nic(net_frontend):
        assert net_frontend.send([b"\\xff" * 12 + b"\\x88\\xb5" + bytes(50)]) == 1
''')


def _pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD,
                          check=False)


def test_plugin_runs_the_suite_as_tests(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    r = _pytest(tmp_path, "--pyargs", "vhostuser.testing", "-q",
                "--vhost-backend", f"{OURS} serve --socket {{socket}}", "--vhost-device", "net",
                "--vhost-only", "HS,ACK,NET", "--vhost-json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "passed" in r.stdout
    doc = json.loads(out.read_text())
    ids = {x["id"] for x in doc["results"]}
    assert {"HS-01", "ACK-01", "NET-01"} <= ids
    assert doc["summary"]["failed"] == 0


def test_plugin_fixtures_drive_a_backend(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(PLUGIN_USER)
    r = _pytest(tmp_path, "-q", "test_user.py",
                "--vhost-backend", f"{OURS} serve --socket {{socket}}", "--vhost-device", "net")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "3 passed" in r.stdout, r.stdout


def test_plugin_is_inert_without_its_options(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text(PLUGIN_USER)
    r = _pytest(tmp_path, "-q", "-rs", "test_user.py")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 passed, 2 skipped" in r.stdout, r.stdout
    assert "--vhost-backend" in r.stdout
    r = _pytest(tmp_path, "-q", "--pyargs", "vhostuser.testing")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "1 skipped" in r.stdout, r.stdout
