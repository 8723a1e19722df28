"""FrameDecoder under Hypothesis: any chunking gives the same messages, fds go to the right
message, and on any input the only exception is RemoteProtocolError with every fd accounted.
"""

from __future__ import annotations

import itertools
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostuser.errors import RemoteProtocolError
from vhostuser.protocol.enums import FrontendRequest
from vhostuser.protocol.framing import (
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    Direction,
    FrameDecoder,
    Message,
)

HEADER = struct.Struct("<III")

settings.register_profile("framing", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("framing")


class Tok:
    """An opaque fd token (the decoder must never look inside)."""

    _ids = itertools.count()

    def __init__(self) -> None:
        self.id = next(self._ids)

    def __repr__(self) -> str:
        return f"Tok({self.id})"


@dataclass(frozen=True)
class Spec:
    request: int
    flags: int
    payload: bytes
    nfds: int

    def wire(self) -> bytes:
        return HEADER.pack(self.request, self.flags, len(self.payload)) + self.payload


def _flags_for(direction: Direction) -> st.SearchStrategy[int]:
    if direction is Direction.REPLIES:
        return st.just(0x5)
    if direction is Direction.REQUESTS:
        return st.sampled_from([0x1, 0x9])
    return st.sampled_from([0x1, 0x5, 0x9, 0xD])


@st.composite
def valid_streams(draw: st.DrawFn) -> tuple[Direction, list[Spec]]:
    direction = draw(st.sampled_from(list(Direction)))
    specs = draw(
        st.lists(
            st.builds(
                Spec,
                request=st.integers(0, 0xFFFFFFFF),
                flags=_flags_for(direction),
                payload=st.binary(max_size=80),
                nfds=st.integers(0, 3),
            ),
            min_size=1,
            max_size=8,
        )
    )
    return direction, specs


def _starts(specs: Sequence[Spec]) -> list[int]:
    out, off = [], 0
    for s in specs:
        out.append(off)
        off += len(s.wire())
    return out


def chunk_stream(
    specs: Sequence[Spec], fds: Sequence[Sequence[Tok]], cuts: set[int]
) -> list[tuple[bytes, list[Tok]]]:
    """Cut the stream at ``cuts`` and give each message's fds with the chunk holding its
    first byte. A cut is added where needed so that an fd-carrying message is the last
    message starting in its chunk: that is what the kernel guarantees (SCM_RIGHTS arrive
    with the first skb of the sendmsg that carried them, and the read ends with that skb),
    and what the decoder documents."""
    stream = b"".join(s.wire() for s in specs)
    starts = _starts(specs)
    cuts = {c for c in cuts if 0 < c < len(stream)}
    for i in range(len(specs) - 1):
        if fds[i] and not any(starts[i] < c <= starts[i + 1] for c in cuts):
            cuts.add(starts[i + 1])
    bounds = [0, *sorted(cuts), len(stream)]
    chunks: list[tuple[bytes, list[Tok]]] = []
    for lo, hi in itertools.pairwise(bounds):
        mine: list[Tok] = []
        for i, start in enumerate(starts):
            if lo <= start < hi:
                mine.extend(fds[i])
        chunks.append((stream[lo:hi], mine))
    return chunks


def decode_all(
    direction: Direction, chunks: Sequence[tuple[bytes, Sequence[Tok]]]
) -> list[Message[Tok]]:
    dec: FrameDecoder[Tok] = FrameDecoder(direction, request_names=FrontendRequest)
    out: list[Message[Tok]] = []
    for data, fds in chunks:
        out.extend(dec.feed(data, fds))
    dec.eof_check()
    assert dec.take_fds() == []
    assert not dec.in_message
    return out


def _expected(specs: Sequence[Spec], fds: Sequence[Sequence[Tok]]) -> list[Message[Tok]]:
    return [Message(s.request, s.flags, s.payload, tuple(f)) for s, f in zip(specs, fds,
                                                                           strict=True)]


@given(valid_streams(), st.data())
def test_any_chunking_gives_the_same_messages_and_fds(
    stream: tuple[Direction, list[Spec]], data: st.DataObject
) -> None:
    direction, specs = stream
    fds = [[Tok() for _ in range(s.nfds)] for s in specs]
    total = sum(len(s.wire()) for s in specs)
    expected = _expected(specs, fds)

    whole = chunk_stream(specs, fds, set())
    assert decode_all(direction, whole) == expected

    byte_by_byte = chunk_stream(specs, fds, set(range(1, total)))
    assert all(len(d) == 1 for d, _ in byte_by_byte)
    assert decode_all(direction, byte_by_byte) == expected

    cuts = data.draw(st.sets(st.integers(1, max(1, total - 1)), max_size=20))
    assert decode_all(direction, chunk_stream(specs, fds, cuts)) == expected


def test_fds_with_the_tail_of_one_message_belong_to_the_next() -> None:
    a = Spec(1, 0x1, b"", 0)
    b = Spec(12, 0x1, bytes(8), 1)
    tok = Tok()
    dec: FrameDecoder[Tok] = FrameDecoder()
    wire = a.wire() + b.wire()
    assert dec.feed(wire[:5]) == []
    # this chunk completes ``a`` and starts ``b``: the fd is b's
    got = dec.feed(wire[5:14], [tok])
    assert got == [Message(1, 0x1, b"", ())]
    got = dec.feed(wire[14:])
    assert got == [Message(12, 0x1, bytes(8), (tok,))]


# -- any input: only RemoteProtocolError, every fd accounted ---------------------------------


@st.composite
def hostile_streams(draw: st.DrawFn) -> list[tuple[bytes, int]]:
    """Chunks of bytes (mixing well-formed messages, bad headers and garbage) with a number
    of fds each."""
    parts: list[bytes] = []
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["valid", "header", "garbage"]))
        if kind == "valid":
            payload = draw(st.binary(max_size=40))
            flags = draw(st.sampled_from([0x1, 0x5, 0x9, 0xD]))
            parts.append(HEADER.pack(draw(st.integers(0, 50)), flags, len(payload)) + payload)
        elif kind == "header":
            size = draw(st.sampled_from([0, 8, 40, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xFFFFFFFF]))
            flags = draw(st.integers(0, 0xFFFFFFFF) | st.sampled_from([0, 2, 3, 0x11, 0x5]))
            parts.append(HEADER.pack(draw(st.integers(0, 0xFFFFFFFF)), flags, size))
        else:
            parts.append(draw(st.binary(max_size=64)))
    stream = b"".join(parts)
    cuts = sorted(draw(st.sets(st.integers(0, len(stream)), max_size=10)))
    bounds = [0, *cuts, len(stream)]
    return [
        (stream[lo:hi], draw(st.integers(0, MAX_FDS + 2)))
        for lo, hi in itertools.pairwise(bounds)
    ]


@given(
    hostile_streams(),
    st.sampled_from(list(Direction)),
    st.integers(1, MAX_FDS),
    st.booleans(),
)
def test_any_input_raises_only_remote_protocol_error_and_loses_no_fd(
    chunks: list[tuple[bytes, int]], direction: Direction, max_fds: int, eof: bool
) -> None:
    dec: FrameDecoder[Tok] = FrameDecoder(direction, max_fds=max_fds)
    fed: list[Tok] = []
    delivered: list[Tok] = []
    errored = False
    for data, n in chunks:
        toks = [Tok() for _ in range(n)]
        fed.extend(toks)
        try:
            for m in dec.feed(data, toks):
                delivered.extend(m.fds)
                assert len(m.fds) <= max_fds
        except RemoteProtocolError as e:
            assert str(e)
            errored = True
    if eof:
        try:
            dec.eof_check()
        except RemoteProtocolError:
            errored = True
    back = dec.take_fds()
    assert dec.take_fds() == []  # take_fds forgets what it returned
    got = Counter(t.id for t in delivered + back)
    assert got == Counter(t.id for t in fed), "an fd was lost or duplicated"
    assert all(v == 1 for v in got.values())
    if errored:
        # sticky: any later feed raises too and still accounts for its fds
        late = Tok()
        with pytest.raises(RemoteProtocolError):
            dec.feed(HEADER.pack(1, 1, 0), [late])
        assert dec.take_fds() == [late]


@given(st.binary(max_size=300), st.sampled_from(list(Direction)))
def test_random_bytes_one_chunk(data: bytes, direction: Direction) -> None:
    dec: FrameDecoder[Tok] = FrameDecoder(direction)
    toks = [Tok(), Tok()]
    try:
        msgs = dec.feed(data, toks)
    except RemoteProtocolError:
        msgs = []
    got = [t for m in msgs for t in m.fds] + dec.take_fds()
    assert sorted(t.id for t in got) == sorted(t.id for t in toks)


# -- header cases ------------------------------------------------------------------------


def test_size_0xffffffff_is_refused_from_the_header_alone() -> None:
    dec: FrameDecoder[Tok] = FrameDecoder()
    tok = Tok()
    with pytest.raises(RemoteProtocolError, match="4294967295"):
        dec.feed(HEADER.pack(FrontendRequest.SET_MEM_TABLE, 0x1, 0xFFFFFFFF), [tok])
    assert dec.take_fds() == [tok]
    assert dec.bytes_pending == 12  # nothing was allocated for the payload


@pytest.mark.parametrize("size", [MAX_PAYLOAD + 1, 0x10000, 0x7FFFFFFF])
def test_payload_larger_than_the_limit(size: int) -> None:
    dec: FrameDecoder[Tok] = FrameDecoder()
    with pytest.raises(RemoteProtocolError, match=str(size)):
        dec.feed(HEADER.pack(1, 0x1, size))


def test_payload_at_the_limit_is_accepted() -> None:
    dec: FrameDecoder[Tok] = FrameDecoder()
    (m,) = dec.feed(HEADER.pack(25, 0x1, MAX_PAYLOAD) + bytes(MAX_PAYLOAD))
    assert len(m.payload) == MAX_PAYLOAD


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("flags", [0x0, 0x2, 0x3, 0x4, 0x8, 0xA, 0xB, 0x6, 0x7])
def test_version_bits_other_than_1(direction: Direction, flags: int) -> None:
    dec: FrameDecoder[Tok] = FrameDecoder(direction)
    with pytest.raises(RemoteProtocolError, match=f"{flags:#x}"):
        dec.feed(HEADER.pack(1, flags, 0))


@pytest.mark.parametrize("direction", list(Direction))
@pytest.mark.parametrize("flags", [0x11, 0x21, 0x101, 0x80000001, 0xFFFFFFFD])
def test_reserved_flag_bits(direction: Direction, flags: int) -> None:
    dec: FrameDecoder[Tok] = FrameDecoder(direction)
    with pytest.raises(RemoteProtocolError, match=f"{flags:#x}"):
        dec.feed(HEADER.pack(1, flags, 0))


@pytest.mark.parametrize("flags", [0x5, 0xD])
def test_reply_flag_on_a_request(flags: int) -> None:
    dec: FrameDecoder[Tok] = FrameDecoder(Direction.REQUESTS, request_names=FrontendRequest)
    with pytest.raises(RemoteProtocolError, match=r"GET_FEATURES.*REPLY"):
        dec.feed(HEADER.pack(1, flags, 0))


@pytest.mark.parametrize("flags", [0x1, 0x9, 0xD])
def test_replies_mode_needs_flags_exactly_0x5(flags: int) -> None:
    dec: FrameDecoder[Tok] = FrameDecoder(Direction.REPLIES)
    with pytest.raises(RemoteProtocolError, match=f"{flags:#x}"):
        dec.feed(HEADER.pack(1, flags, 8) + bytes(8))


@given(st.integers(0, 0xFFFFFFFF), st.sampled_from(list(Direction)))
def test_header_flags_accepted_exactly_per_mode(flags: int, direction: Direction) -> None:
    valid_version = flags & 0x3 == 1 and not flags & ~0xF
    if direction is Direction.REQUESTS:
        ok = valid_version and not flags & 0x4
    elif direction is Direction.REPLIES:
        ok = flags == 0x5
    else:
        ok = valid_version
    dec: FrameDecoder[Tok] = FrameDecoder(direction)
    try:
        msgs = dec.feed(HEADER.pack(3, flags, 0))
    except RemoteProtocolError:
        assert not ok
    else:
        assert ok
        assert msgs == [Message(3, flags, b"", ())]


def test_too_many_fds_for_one_message() -> None:
    dec: FrameDecoder[Tok] = FrameDecoder()
    toks = [Tok() for _ in range(MAX_FDS + 1)]
    with pytest.raises(RemoteProtocolError, match=str(MAX_FDS + 1)):
        dec.feed(HEADER.pack(5, 0x1, 8) + bytes(8), toks)
    assert sorted(t.id for t in dec.take_fds()) == sorted(t.id for t in toks)


def test_exactly_max_fds_is_fine() -> None:
    dec: FrameDecoder[Tok] = FrameDecoder()
    toks = [Tok() for _ in range(MAX_FDS)]
    (m,) = dec.feed(HEADER.pack(5, 0x1, 8) + bytes(8), toks)
    assert list(m.fds) == toks


# -- eof_check -----------------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, HEADER_SIZE))
def test_eof_after_a_partial_header(n: int) -> None:
    dec: FrameDecoder[Tok] = FrameDecoder()
    assert dec.feed(HEADER.pack(1, 0x1, 0)[:n]) == []
    assert dec.in_message
    with pytest.raises(RemoteProtocolError, match=f"after {n} bytes"):
        dec.eof_check()


@pytest.mark.parametrize("got", [0, 1, 7])
def test_eof_after_a_partial_payload(got: int) -> None:
    dec: FrameDecoder[Tok] = FrameDecoder(request_names=FrontendRequest)
    tok = Tok()
    assert dec.feed(HEADER.pack(FrontendRequest.SET_VRING_KICK, 0x1, 8) + bytes(got),
                    [tok]) == []
    with pytest.raises(RemoteProtocolError, match=f"SET_VRING_KICK.*{got} of 8"):
        dec.eof_check()
    assert dec.take_fds() == [tok]


def test_eof_at_a_message_boundary_is_clean() -> None:
    dec: FrameDecoder[Tok] = FrameDecoder()
    dec.eof_check()
    assert len(dec.feed(HEADER.pack(1, 0x1, 0) * 3)) == 3
    dec.eof_check()
    assert not dec.in_message
