"""Errors that name what to do: a front-end without shared guest RAM, and the debug log
naming requests."""

from __future__ import annotations

import logging

import pytest

from vhostuser.errors import RemoteProtocolError
from vhostuser.protocol.enums import FrontendRequest

from .fakes import feed, handshake, make_backend, req, ring_addr

R = FrontendRequest


def test_ring_addresses_without_memory_name_share_on() -> None:
    conn, _host, _factory, fds = make_backend()
    handshake(conn, fds, memory=False)  # QEMU without a shared memory backend sends none
    with pytest.raises(RemoteProtocolError, match=r"before any memory table.*share=on"):
        feed(conn, req(R.SET_VRING_ADDR, ring_addr(0)))


def test_debug_log_names_requests(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="vhostuser.connection.backend")
    conn, _host, _factory, fds = make_backend()
    handshake(conn, fds)
    lines = [r.getMessage() for r in caplog.records if ": <- " in r.getMessage()]
    assert any("<- GET_FEATURES flags=0x1" in x for x in lines), lines
    assert any("<- SET_MEM_TABLE" in x and "fds=1" in x for x in lines), lines
