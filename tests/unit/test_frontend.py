"""frontend: typed client messages — round trips, readers, malformed payloads."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenantgate.errors import LocalProtocolError, RemoteProtocolError
from tenantgate.protocol.framing import MessageReader, frame
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
    bind_params_at,
    decode_frontend,
)

MESSAGES: list[FrontendMessage] = [
    Query("SELECT 1"),
    Query(""),
    Query("SELECT 'é✓'; SELECT 2"),
    Parse("", "SELECT $1, $2", (23, 0xFFFFFFFF)),
    Parse("stmt", "SELECT 1"),
    Bind("", "stmt"),
    Bind("portal", "stmt", (0, 1), (b"42", None, b"", b"\x00\xff"), (1,)),
    Execute(),
    Execute("portal", 100),
    Describe("S", "stmt"),
    Describe("P"),
    Close("S", "stmt"),
    Close("P", "portal"),
    Sync(),
    Flush(),
    Terminate(),
    CopyData(b""),
    CopyData(b"1\tacme\n" * 100),
    CopyDone(),
    CopyFail("aborted by user"),
    FunctionCall(1598, b"\x00\x00\x00\x00"),
    FunctionCall(0x7FFFFFFF, b""),
    PasswordMessage(b"secret\x00"),
    PasswordMessage(b""),
]
TRAILING = Query("SELECT 'next'").encode()


def read(chunks: list[bytes]) -> tuple[list[FrontendMessage], int]:
    reader = MessageReader()
    out: list[FrontendMessage] = []
    for chunk in chunks:
        reader.feed(chunk)
        out.extend(decode_frontend(t, p) for t, p in reader.drain())
    return out, reader.buffered


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def payload_of(data: bytes) -> bytes:
    return data[5:]


@pytest.mark.parametrize("message", MESSAGES, ids=repr)
def test_round_trip(message: FrontendMessage) -> None:
    data = message.encode()
    assert struct.unpack("!I", data[1:5])[0] == len(data) - 1
    assert data[:1] == message.TYPE
    assert decode_frontend(data[0], data[5:]) == message


@pytest.mark.parametrize("split", [whole, bytewise])
def test_conversation_whole_bytewise_trailing(split: Callable[[bytes], list[bytes]]) -> None:
    data = b"".join(m.encode() for m in MESSAGES)
    assert read(split(data)) == (MESSAGES, 0)
    partial = TRAILING[:-1]
    assert read(split(data + partial)) == (MESSAGES, len(partial))
    assert read(split(data + TRAILING)) == ([*MESSAGES, Query("SELECT 'next'")], 0)


def test_wire_layout_parse_bind_execute() -> None:
    assert Parse("s", "q", (23,)).encode() == b"P\x00\x00\x00\x0es\x00q\x00\x00\x01\x00\x00\x00\x17"
    assert Bind("", "s", (), (None, b"ab"), ()).encode() == (
        b"B\x00\x00\x00\x17\x00s\x00\x00\x00\x00\x02\xff\xff\xff\xff\x00\x00\x00\x02ab\x00\x00"
    )
    assert Execute("", 0).encode() == b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"
    assert Describe("P", "").encode() == b"D\x00\x00\x00\x06P\x00"


@pytest.mark.parametrize(
    "message",
    [
        SASLInitialResponse("SCRAM-SHA-256", b"n,,n=,r=abc"),
        SASLInitialResponse("SCRAM-SHA-256-PLUS", b""),
        SASLInitialResponse("SCRAM-SHA-256", None),
    ],
    ids=repr,
)
def test_sasl_initial_response_round_trip(message: SASLInitialResponse) -> None:
    data = message.encode()
    decoded = decode_frontend(data[0], data[5:])
    assert isinstance(decoded, PasswordMessage)  # 'p' is ambiguous: context decides
    assert SASLInitialResponse.decode(decoded.data) == message


def test_sasl_initial_response_null_is_minus_one() -> None:
    assert SASLInitialResponse("M", None).encode() == b"p\x00\x00\x00\x0aM\x00\xff\xff\xff\xff"


@pytest.mark.parametrize(
    ("formats", "expected"),
    [
        ((), [False, False, False]),
        ((1,), [True, True, True]),
        ((0,), [False, False, False]),
        ((0, 1), [False, True, False]),
        ((1, 0, 1), [True, False, True]),
    ],
)
def test_bind_param_is_binary(formats: tuple[int, ...], expected: list[bool]) -> None:
    bind = Bind("", "", formats, (b"a", b"b", b"c"))
    assert [bind.param_is_binary(i) for i in range(3)] == expected


def test_encoders_refuse_nul_in_strings() -> None:
    with pytest.raises(LocalProtocolError):
        Query("SELECT 1\x00; DROP TABLE x").encode()
    with pytest.raises(LocalProtocolError):
        Parse("a\x00", "q").encode()


def int16(value: int) -> bytes:
    return struct.pack("!h", value)


def int32(value: int) -> bytes:
    return struct.pack("!i", value)


@pytest.mark.parametrize(
    ("msg_type", "payload", "message"),
    [
        pytest.param(b"Q", b"SELECT 1", "terminator", id="query-no-nul"),
        pytest.param(b"Q", b"SELECT 1\x00x", "trailing", id="query-trailing"),
        pytest.param(b"Q", b"\xc3\x28\x00", "UTF-8", id="query-bad-utf8"),
        pytest.param(b"Q", b"", "terminator", id="query-empty-payload"),
        pytest.param(
            b"P", b"s\x00q\x00" + int16(-1), "truncated", id="parse-count-65535-truncated"
        ),
        pytest.param(b"P", b"s\x00q\x00" + int16(2) + int32(23), "truncated", id="parse-short"),
        pytest.param(b"P", b"s\x00q\x00", "truncated", id="parse-no-count"),
        pytest.param(b"P", b"s\x00q", "terminator", id="parse-query-no-nul"),
        pytest.param(b"P", b"s\x00q\x00" + int16(0) + b"!", "trailing", id="parse-trailing"),
        pytest.param(
            b"B", b"\x00s\x00" + int16(-1), "truncated", id="bind-formats-65535-truncated"
        ),
        pytest.param(
            b"B", b"\x00s\x00" + int16(0) + int16(-3), "truncated", id="bind-params-65533-truncated"
        ),
        pytest.param(
            b"B",
            b"\x00s\x00" + int16(0) + int16(1) + int32(-2) + int16(0),
            "invalid parameter length",
            id="bind-length-minus-two",
        ),
        pytest.param(
            b"B",
            b"\x00s\x00" + int16(0) + int16(1) + int32(10) + b"abc",
            "truncated",
            id="bind-value-truncated",
        ),
        pytest.param(
            b"B",
            b"\x00s\x00" + int16(0) + int16(0) + int16(-1),
            "truncated",
            id="bind-result-formats-65535-truncated",
        ),
        pytest.param(b"B", b"\x00s\x00" + int16(0) + int16(0), "truncated", id="bind-no-results"),
        pytest.param(b"E", b"\x00\x00\x00", "truncated", id="execute-short"),
        pytest.param(b"E", b"p", "terminator", id="execute-no-nul"),
        pytest.param(b"E", b"\x00" + int32(0) + b"x", "trailing", id="execute-trailing"),
        pytest.param(b"D", b"X\x00", "kind must be", id="describe-bad-kind"),
        pytest.param(b"D", b"", "truncated", id="describe-empty"),
        pytest.param(b"D", b"S", "terminator", id="describe-no-nul"),
        pytest.param(b"C", b"s\x00", "kind must be", id="close-lowercase-kind"),
        pytest.param(b"C", b"P\x00\x00", "trailing", id="close-trailing"),
        pytest.param(b"S", b"\x00", "no payload", id="sync-payload"),
        pytest.param(b"H", b"x", "no payload", id="flush-payload"),
        pytest.param(b"X", b"x", "no payload", id="terminate-payload"),
        pytest.param(b"c", b"x", "no payload", id="copydone-payload"),
        pytest.param(b"f", b"oops", "terminator", id="copyfail-no-nul"),
        pytest.param(b"F", b"\x00\x01", "truncated", id="functioncall-short"),
        pytest.param(b"Z", b"", "unknown frontend message", id="unknown-Z"),
        pytest.param(b"\x00", b"", "unknown frontend message", id="unknown-nul"),
        pytest.param(b"T", b"", "unknown frontend message", id="unknown-T"),
    ],
)
def test_malformed(msg_type: bytes, payload: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_frontend(msg_type[0], payload)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"M", id="no-nul"),
        pytest.param(b"M\x00\x00\x00", id="short-length"),
        pytest.param(b"M\x00" + int32(-2), id="length-minus-two"),
        pytest.param(b"M\x00" + int32(5) + b"abc", id="truncated"),
        pytest.param(b"M\x00" + int32(1) + b"ab", id="trailing"),
    ],
)
def test_malformed_sasl_initial_response(payload: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        SASLInitialResponse.decode(payload)


def test_malformed_messages_through_reader() -> None:
    reader = MessageReader()
    reader.feed(frame(b"P", b"s\x00q\x00" + int16(-5)) + Sync().encode())
    first = reader.next_message()
    assert first is not None
    with pytest.raises(RemoteProtocolError):
        decode_frontend(*first)
    assert reader.next_message() == (ord("S"), b"")


# --- bugs ------------------------------------------------------------------------------
# PostgreSQL reads the Parse/Bind counts as unsigned 16-bit (pq_getmsgint(msg, 2)) and
# accepts up to 65535 parameters; libpq and psycopg send that many.


def test_parse_with_40000_parameter_types_decodes() -> None:
    payload = b"\x00SELECT 1\x00" + struct.pack("!H", 40000) + b"\x00\x00\x00\x17" * 40000
    assert Parse.decode(payload).param_types == (23,) * 40000


def test_bind_with_40000_parameters_decodes() -> None:
    payload = b"\x00\x00" + int16(0) + struct.pack("!H", 40000)
    payload += (int32(1) + b"7") * 40000 + int16(0)
    assert Bind.decode(payload).params == (b"7",) * 40000


def test_parse_with_40000_parameter_types_encodes() -> None:
    data = Parse("", "SELECT 1", (23,) * 40000).encode()
    assert data[1 + 4 + 1 + 9 : 1 + 4 + 1 + 9 + 2] == struct.pack("!H", 40000)


def test_function_call_high_oid_round_trip() -> None:
    message = FunctionCall(3_000_000_000, b"")
    data = message.encode()
    assert decode_frontend(data[0], data[5:]) == message


# --- bind_params_at: the parameters the tenant check needs, read in place ------------

# Names a Bind can carry: UTF-8, so no NUL and no lone surrogate.
_names = st.text(
    st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=4
)
_values = st.one_of(st.none(), st.binary(max_size=6))
_binds = st.builds(
    Bind,
    portal=_names,
    statement=_names,
    param_formats=st.lists(st.integers(-2, 2), max_size=4).map(tuple),
    params=st.lists(_values, max_size=4).map(tuple),
    result_formats=st.lists(st.integers(0, 1), max_size=3).map(tuple),
)
_numbers = st.lists(st.integers(1, 5), max_size=3, unique=True).map(lambda n: tuple(sorted(n)))


def _formats_at(payload: bytes) -> int:
    """Where a Bind payload's parameter-format codes start (after its two names)."""
    return payload.index(0, payload.index(0) + 1) + 1


@given(_binds, _numbers)
def test_bind_params_at_reads_what_decode_reads(bind: Bind, numbers: tuple[int, ...]) -> None:
    payload = bind.encode()[5:]
    found = bind_params_at(payload, _formats_at(payload), numbers)
    if any(n > len(bind.params) for n in numbers):
        assert found is None  # missing: the general path refuses it
    else:
        assert found == [(bind.params[n - 1], bind.param_is_binary(n - 1)) for n in numbers]


@given(_binds, _numbers, st.data())
def test_bind_params_at_accepts_nothing_decode_refuses(
    bind: Bind, numbers: tuple[int, ...], data: st.DataObject
) -> None:
    """Cut short, trailing bytes, or any byte changed: whatever bind_params_at reads,
    Bind.decode reads the same from the same bytes (never a malformed Bind waved on)."""
    payload = bind.encode()[5:]
    at = _formats_at(payload)
    damage = data.draw(st.sampled_from(["truncate", "trail", "flip"]))
    if damage == "truncate":
        payload = payload[: data.draw(st.integers(at, len(payload) - 1))]
    elif damage == "trail":
        payload += data.draw(st.binary(min_size=1, max_size=3))
    else:
        index = data.draw(st.integers(at, len(payload) - 1))
        payload = payload[:index] + bytes([data.draw(st.integers(0, 255))]) + payload[index + 1 :]
    found = bind_params_at(payload, at, numbers)
    if found is None:
        return
    decoded = Bind.decode(payload)  # raises if bind_params_at accepted a malformed Bind
    assert found == [(decoded.params[n - 1], decoded.param_is_binary(n - 1)) for n in numbers]
