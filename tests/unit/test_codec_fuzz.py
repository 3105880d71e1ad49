"""Property tests: random bytes only ever raise RemoteProtocolError; generated messages
round-trip through encode, arbitrary chunking and decode."""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Callable

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tenantgate.errors import RemoteProtocolError
from tenantgate.protocol.backend import (
    Authentication,
    BackendKeyData,
    BackendMessage,
    CommandComplete,
    CopyResponse,
    DataRow,
    Empty,
    ErrorResponse,
    FieldDescription,
    NegotiateProtocolVersion,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    RawBackend,
    ReadyForQuery,
    RowDescription,
    decode_backend,
)
from tenantgate.protocol.codec import PayloadCursor
from tenantgate.protocol.framing import FirstPacketReader, MessageReader, frame
from tenantgate.protocol.frontend import (
    Bind,
    Close,
    CopyData,
    CopyDone,
    CopyFail,
    Describe,
    Execute,
    Flush,
    FrontendMessage,
    FunctionCall,
    Parse,
    PasswordMessage,
    Query,
    SASLInitialResponse,
    Sync,
    Terminate,
    decode_frontend,
)
from tenantgate.protocol.startup import (
    CANCEL_REQUEST_CODE,
    PROTOCOL_3_0,
    PROTOCOL_3_2,
    SSL_REQUEST_CODE,
    CancelRequest,
    FirstPacket,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_first_packet,
)

FUZZ = settings(
    max_examples=120, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
ROUND_TRIP = settings(
    max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

INT16 = st.integers(-(2**15), 2**15 - 1)
INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.integers(0, 2**32 - 1)
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=30)
VALUE = st.none() | st.binary(max_size=20)

# Mostly protocol-relevant type bytes, sometimes any byte.
FRONTEND_TYPES = st.sampled_from(b"QPBEDCSHXdcfFp") | st.integers(0, 255)
BACKEND_TYPES = st.sampled_from(b"RKSZECvtDTAGHWdV123nIsc") | st.integers(0, 255)


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# --- random input only ever raises RemoteProtocolError ---------------------------------


def drain_frontend(chunks: list[bytes]) -> list[FrontendMessage]:
    reader = MessageReader(max_size=4096)
    out: list[FrontendMessage] = []
    for chunk in chunks:
        reader.feed(chunk)
        out.extend(decode_frontend(t, p) for t, p in reader.drain())
    return out


def drain_backend(chunks: list[bytes]) -> list[BackendMessage]:
    reader = MessageReader(max_size=4096)
    out: list[BackendMessage] = []
    for chunk in chunks:
        reader.feed(chunk)
        out.extend(decode_backend(t, p) for t, p in reader.drain())
    return out


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6))
def test_random_bytes_frontend(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        drain_frontend(split_at(data, cuts))


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6))
def test_random_bytes_backend(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        drain_backend(split_at(data, cuts))


@FUZZ
@given(st.lists(st.tuples(FRONTEND_TYPES, st.binary(max_size=60)), min_size=1, max_size=5))
def test_well_framed_random_payloads_frontend(items: list[tuple[int, bytes]]) -> None:
    # Valid framing, random payloads: reaches every decoder, not just the framer.
    for msg_type, payload in items:
        try:
            decoded = decode_frontend(msg_type, payload)
        except RemoteProtocolError:
            continue
        assert bytes([msg_type]) == decoded.TYPE


@FUZZ
@given(st.lists(st.tuples(BACKEND_TYPES, st.binary(max_size=60)), min_size=1, max_size=5))
def test_well_framed_random_payloads_backend(items: list[tuple[int, bytes]]) -> None:
    for msg_type, payload in items:
        try:
            decoded = decode_backend(msg_type, payload)
        except RemoteProtocolError:
            continue
        assert decoded.encode()[:1] == bytes([msg_type])


@FUZZ
@given(st.binary(max_size=60))
def test_random_sasl_initial_response(payload: bytes) -> None:
    try:
        decoded = SASLInitialResponse.decode(payload)
    except RemoteProtocolError:
        return
    assert decoded.encode()[5:] == payload


def read_first_packets(chunks: list[bytes]) -> list[FirstPacket]:
    reader = FirstPacketReader()
    out: list[FirstPacket] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (body := reader.next_packet()) is not None:
            out.append(decode_first_packet(body))
    return out


@FUZZ
@given(st.binary(max_size=200), st.lists(st.integers(0, 300), max_size=6))
def test_random_bytes_first_packet(data: bytes, cuts: list[int]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        read_first_packets(split_at(data, cuts))


FIRST_CODES = st.sampled_from(
    [PROTOCOL_3_0, PROTOCOL_3_2, SSL_REQUEST_CODE, CANCEL_REQUEST_CODE, 80877104]
) | st.integers(0, 2**32 - 1)


@FUZZ
@given(FIRST_CODES, st.binary(max_size=80))
def test_random_first_packet_bodies(code: int, rest: bytes) -> None:
    body = struct.pack("!I", code) + rest
    try:
        decoded = decode_first_packet(body)
    except RemoteProtocolError:
        return
    assert decoded.encode()[4:] == body


# --- generated messages round-trip -----------------------------------------------------

BINDS = st.builds(
    Bind,
    TEXT,
    TEXT,
    st.lists(INT16, max_size=5).map(tuple),
    st.lists(VALUE, max_size=5).map(tuple),
    st.lists(INT16, max_size=5).map(tuple),
)
FRONTEND_MESSAGES: st.SearchStrategy[FrontendMessage] = st.one_of(
    st.builds(Query, TEXT),
    st.builds(Parse, TEXT, TEXT, st.lists(UINT32, max_size=8).map(tuple)),
    BINDS,
    st.builds(Execute, TEXT, INT32),
    st.builds(Describe, st.sampled_from("SP"), TEXT),
    st.builds(Close, st.sampled_from("SP"), TEXT),
    st.just(Sync()),
    st.just(Flush()),
    st.just(Terminate()),
    st.builds(CopyData, st.binary(max_size=50)),
    st.just(CopyDone()),
    st.builds(CopyFail, TEXT),
    st.builds(FunctionCall, st.integers(0, 2**31 - 1), st.binary(max_size=20)),
    st.builds(PasswordMessage, st.binary(max_size=30)),
)

FIELD_CODES = st.sampled_from("SVCMDHPpqWstcdnFLR")
FIELDS = st.builds(FieldDescription, TEXT, UINT32, INT16, UINT32, INT16, INT32, INT16)
BACKEND_MESSAGES: st.SearchStrategy[BackendMessage] = st.one_of(
    st.builds(Authentication, INT32, st.binary(max_size=30)),
    st.builds(BackendKeyData, INT32, st.binary(min_size=4, max_size=256)),
    st.builds(ParameterStatus, TEXT, TEXT),
    st.builds(ReadyForQuery, st.sampled_from("ITE")),
    st.builds(
        ErrorResponse,
        st.lists(st.tuples(FIELD_CODES, TEXT), max_size=6).map(tuple),
        st.booleans(),
    ),
    st.builds(CommandComplete, TEXT),
    st.builds(NegotiateProtocolVersion, UINT32, st.lists(TEXT, max_size=4).map(tuple)),
    st.builds(ParameterDescription, st.lists(UINT32, max_size=8).map(tuple)),
    st.builds(DataRow, st.lists(VALUE, max_size=8).map(tuple)),
    st.builds(RowDescription, st.lists(FIELDS, max_size=4).map(tuple)),
    st.builds(NotificationResponse, INT32, TEXT, TEXT),
    st.builds(
        CopyResponse,
        st.sampled_from("GHW"),
        st.integers(0, 255),
        st.lists(INT16, max_size=6).map(tuple),
    ),
    st.builds(Empty, st.sampled_from("123nIsc")),
    st.builds(RawBackend, st.sampled_from("dV"), st.binary(max_size=40)),
)

FIRST_PACKETS: st.SearchStrategy[FirstPacket] = st.one_of(
    st.builds(
        StartupMessage,
        st.sampled_from([PROTOCOL_3_0, PROTOCOL_3_2]),
        st.dictionaries(TEXT.filter(bool), TEXT, max_size=5).map(lambda d: tuple(d.items())),
    ),
    st.just(SSLRequest()),
    st.just(GSSENCRequest()),
    st.builds(CancelRequest, INT32, st.binary(min_size=4, max_size=256)),
)


@ROUND_TRIP
@given(st.lists(FRONTEND_MESSAGES, min_size=1, max_size=6), st.lists(st.integers(0, 10**4)))
def test_frontend_round_trip(messages: list[FrontendMessage], cuts: list[int]) -> None:
    data = b"".join(m.encode() for m in messages)
    assert drain_frontend(split_at(data, cuts)) == messages


@ROUND_TRIP
@given(st.lists(BACKEND_MESSAGES, min_size=1, max_size=6), st.lists(st.integers(0, 10**4)))
def test_backend_round_trip(messages: list[BackendMessage], cuts: list[int]) -> None:
    data = b"".join(m.encode() for m in messages)
    assert drain_backend(split_at(data, cuts)) == messages


@ROUND_TRIP
@given(FIRST_PACKETS, st.lists(st.integers(0, 10**4)), st.binary(max_size=10))
def test_first_packet_round_trip(packet: FirstPacket, cuts: list[int], trailing: bytes) -> None:
    data = packet.encode()
    reader = FirstPacketReader()
    got: list[FirstPacket] = []
    for chunk in split_at(data + trailing, cuts):
        reader.feed(chunk)
        if not got and (body := reader.next_packet()) is not None:
            got.append(decode_first_packet(body))
    assert got == [packet]
    assert reader.trailing == trailing


@ROUND_TRIP
@given(st.builds(SASLInitialResponse, TEXT, st.none() | st.binary(max_size=40)))
def test_sasl_initial_response_round_trip(message: SASLInitialResponse) -> None:
    data = message.encode()
    decoded = decode_frontend(data[0], data[5:])
    assert isinstance(decoded, PasswordMessage)
    assert SASLInitialResponse.decode(decoded.data) == message


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(1, 2**20))
@example(4, 1)
@example(5, 1)
@example(6, 1)
@example(2**31, 2**20)
def test_message_reader_length_limit(length: int, cap: int) -> None:
    reader = MessageReader(max_size=cap)
    reader.feed(b"d" + struct.pack("!I", length))
    if length < 4 or length - 4 > cap:
        try:
            reader.next_message()
        except RemoteProtocolError:
            return
        raise AssertionError("length outside the limit was accepted")
    if length > 4:
        assert reader.next_message() is None  # waits for the payload
    reader.feed(b"\x00" * (length - 4))
    assert reader.next_message() == (ord("d"), b"\x00" * (length - 4))


def test_frame_helper_matches_reader() -> None:
    reader = MessageReader()
    reader.feed(frame(b"d", b"abc"))
    assert reader.drain() == [(ord("d"), b"abc")]


# --- Bind's hand-written decoder against the cursor's reading of the same bytes -------


def bind_by_cursor(payload: bytes) -> Bind:
    """Bind read field by field with PayloadCursor: the reference for Bind.decode."""
    cursor = PayloadCursor(payload, "Bind")
    portal = cursor.cstring()
    statement = cursor.cstring()
    formats = tuple(cursor.int16() for _ in range(cursor.uint16()))
    params: list[bytes | None] = []
    for _ in range(cursor.uint16()):
        size = cursor.int32()
        if size < -1:
            raise RemoteProtocolError("Bind: invalid parameter length")
        params.append(None if size == -1 else cursor.take(size))
    results = tuple(cursor.int16() for _ in range(cursor.uint16()))
    cursor.expect_end()
    return Bind(portal, statement, formats, tuple(params), results)


def outcome(decode: Callable[[bytes], Bind], payload: bytes) -> Bind | None:
    try:
        return decode(payload)
    except RemoteProtocolError:
        return None


BIND_PAYLOADS = st.one_of(
    BINDS.map(lambda bind: bind.encode()[5:]),
    st.binary(max_size=60),
)


@FUZZ
@given(BIND_PAYLOADS, st.integers(0, 60), st.binary(max_size=4))
@example(b"\x00\x00\x00\x01\x80\x00\x00\x00\x00\x00", 99, b"")  # format -32768
@example(b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff\x00\x00", 99, b"")  # one NULL
def test_bind_decode_agrees_with_cursor(payload: bytes, cut: int, tail: bytes) -> None:
    """Whole, cut short, or with bytes appended: the fast decoder accepts exactly what
    the cursor accepts, with the same fields."""
    for candidate in (payload, payload[:cut], payload + tail):
        assert outcome(Bind.decode, candidate) == outcome(bind_by_cursor, candidate)


def test_messages_are_values() -> None:
    """Equal when of one class with equal fields, hashing alike; never equal across
    classes with the same fields; repr names every field."""
    assert Parse("s", "q") == Parse("s", "q", ())
    assert hash(Parse("s", "q")) == hash(Parse("s", "q", ()))
    assert Parse("s", "q") != Parse("s", "q", (23,))
    assert Query("x") != CopyFail("x")
    assert Describe("P") != Close("P")
    assert Sync() == Sync()
    assert Sync() != Flush()
    assert len({Bind("", "a", (), (b"1",)), Bind("", "a", (), (b"1",)), Bind("", "b")}) == 2
    assert repr(Execute("p", 5)) == "Execute(portal='p', max_rows=5)"
    assert repr(Terminate()) == "Terminate()"
