"""Several messages in one chunk (one ``recvmsg``): a refused one closes the session, and
the fds of the messages behind it, never handled, are closed too."""

from __future__ import annotations

import pytest

from vhostuser.errors import RemoteProtocolError
from vhostuser.protocol import payloads as P
from vhostuser.protocol.enums import FrontendRequest

from .fakes import FakeDevice, handshake, make_backend, raw, req


def test_fds_behind_a_refused_message_in_the_same_chunk_are_closed() -> None:
    conn, host, _f, fds = make_backend(FakeDevice(num_queues=2))
    handshake(conn, fds)
    chunk = raw(0) + req(FrontendRequest.SET_VRING_CALL, P.VringFile(index=0))
    # The kernel hands the fds over with the chunk; they belong to its last message.
    with pytest.raises(RemoteProtocolError, match="request code 0 is unknown"):
        conn.receive_data(chunk, fds.take(1))
    assert conn.closed
    host.assert_all_released(fds.given)
