"""backend: typed server messages — round trips, readers, malformed payloads."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from tenantgate.errors import PgError, RemoteProtocolError
from tenantgate.protocol.backend import (
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
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
from tenantgate.protocol.framing import MessageReader

ERROR_FIELDS = (
    ("S", "ERROR"),
    ("V", "ERROR"),
    ("C", "42P01"),
    ("M", 'relation "nope" does not exist'),
    ("P", "15"),
    ("F", "parse_relation.c"),
)
MESSAGES: list[BackendMessage] = [
    Authentication(AUTH_OK),
    Authentication.sasl(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
    Authentication(AUTH_SASL_CONTINUE, b"r=abc,s=c2FsdA==,i=4096"),
    Authentication(AUTH_SASL_FINAL, b"v=xyz"),
    Authentication(5, b"salt"),
    BackendKeyData(4242, b"\x01\x02\x03\x04"),
    BackendKeyData(-1, bytes(range(32))),
    ParameterStatus("server_version", "17.2"),
    ParameterStatus("application_name", ""),
    ReadyForQuery("I"),
    ReadyForQuery("T"),
    ReadyForQuery("E"),
    ErrorResponse(ERROR_FIELDS),
    ErrorResponse((("S", "NOTICE"), ("C", "00000"), ("M", "héllo")), notice=True),
    ErrorResponse(()),
    CommandComplete("SELECT 3"),
    CommandComplete("INSERT 0 1"),
    CommandComplete("BEGIN"),
    NegotiateProtocolVersion(0, ("_pq_.compression", "_pq_.x")),
    NegotiateProtocolVersion(2),
    ParameterDescription((23, 25, 0xFFFFFFFF)),
    ParameterDescription(()),
    DataRow((b"1", None, b"", b"\x00\xff")),
    DataRow(()),
    RowDescription(
        (
            FieldDescription("id", 16384, 1, 23, 4, -1, 0),
            FieldDescription("näme", 0xFFFFFFFF, -1, 25, -1, 2**31 - 1, 1),
        )
    ),
    RowDescription(()),
    NotificationResponse(77, "jobs", '{"id": 1}'),
    NotificationResponse(-5, "c", ""),
    CopyResponse("G", 0, (0, 0)),
    CopyResponse("H", 1, (1,)),
    CopyResponse("W", 0, ()),
    *(Empty(kind) for kind in "123nIsc"),
    RawBackend("d", b"1\tacme\n"),
    RawBackend("d", b""),
    RawBackend("V", b"\x00\x00\x00\x04abcd"),
]
TRAILING = ReadyForQuery("I").encode()


def read(chunks: list[bytes]) -> tuple[list[BackendMessage], int]:
    reader = MessageReader()
    out: list[BackendMessage] = []
    for chunk in chunks:
        reader.feed(chunk)
        out.extend(decode_backend(t, p) for t, p in reader.drain())
    return out, reader.buffered


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("message", MESSAGES, ids=repr)
def test_round_trip(message: BackendMessage) -> None:
    data = message.encode()
    assert struct.unpack("!I", data[1:5])[0] == len(data) - 1
    assert decode_backend(data[0], data[5:]) == message


@pytest.mark.parametrize("split", [whole, bytewise])
def test_conversation_whole_bytewise_trailing(split: Callable[[bytes], list[bytes]]) -> None:
    data = b"".join(m.encode() for m in MESSAGES)
    assert read(split(data)) == (MESSAGES, 0)
    assert read(split(data + TRAILING[:3])) == (MESSAGES, 3)
    assert read(split(data + TRAILING)) == ([*MESSAGES, ReadyForQuery("I")], 0)


def test_message_type_bytes() -> None:
    expected: dict[BackendMessage, bytes] = {
        Authentication(AUTH_OK): b"R",
        BackendKeyData(1, b"abcd"): b"K",
        ParameterStatus("a", "b"): b"S",
        ReadyForQuery("I"): b"Z",
        ErrorResponse(()): b"E",
        ErrorResponse((), notice=True): b"N",
        CommandComplete("x"): b"C",
        NegotiateProtocolVersion(0): b"v",
        ParameterDescription(()): b"t",
        DataRow(()): b"D",
        RowDescription(()): b"T",
        NotificationResponse(1, "a", "b"): b"A",
        CopyResponse("G", 0, ()): b"G",
        Empty("s"): b"s",
        RawBackend("d", b""): b"d",
    }
    for message, kind in expected.items():
        assert message.encode()[:1] == kind, message


def test_wire_layouts() -> None:
    assert ReadyForQuery("T").encode() == b"Z\x00\x00\x00\x05T"
    assert Authentication(AUTH_OK).encode() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert DataRow((None, b"ab")).encode() == (
        b"D\x00\x00\x00\x10\x00\x02\xff\xff\xff\xff\x00\x00\x00\x02ab"
    )
    assert ErrorResponse((("C", "X"),)).encode() == b"E\x00\x00\x00\x08CX\x00\x00"


def test_sasl_mechanisms() -> None:
    auth = Authentication.sasl(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert auth.code == AUTH_SASL
    assert auth.data == b"SCRAM-SHA-256-PLUS\x00SCRAM-SHA-256\x00\x00"
    assert auth.sasl_mechanisms() == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
    assert Authentication.sasl(()).sasl_mechanisms() == ()


def test_sasl_mechanisms_unterminated() -> None:
    with pytest.raises(RemoteProtocolError):
        Authentication(AUTH_SASL, b"SCRAM-SHA-256").sasl_mechanisms()


def test_error_response_accessors_and_from_error() -> None:
    error = ErrorResponse(ERROR_FIELDS)
    assert error.sqlstate == "42P01"
    assert error.get("M") == 'relation "nope" does not exist'
    assert error.get("H") is None
    assert ErrorResponse(()).sqlstate is None
    pg = PgError("42501", "tenantgate: no", hint="add a predicate", detail="d")
    built = ErrorResponse.from_error(pg)
    assert built.fields == tuple(pg.fields())
    assert not built.notice
    assert ErrorResponse.from_error(pg, notice=True).encode()[:1] == b"N"
    data = built.encode()
    decoded = decode_backend(data[0], data[5:])
    assert isinstance(decoded, ErrorResponse)
    assert decoded.sqlstate == "42501"
    assert decoded.get("H") == "add a predicate"


@pytest.mark.parametrize(
    ("tag", "rows"),
    [
        ("SELECT 5", 5),
        ("INSERT 0 3", 3),
        ("UPDATE 0", 0),
        ("DELETE 12", 12),
        ("COPY 1000000", 1000000),
        ("MERGE 2", 2),
        ("FETCH 7", 7),
        ("BEGIN", None),
        ("CREATE TABLE", None),
        ("SET", None),
        ("", None),
        ("42", None),
    ],
)
def test_command_complete_rows(tag: str, rows: int | None) -> None:
    assert CommandComplete(tag).rows == rows


def int16(value: int) -> bytes:
    return struct.pack("!h", value)


def int32(value: int) -> bytes:
    return struct.pack("!i", value)


@pytest.mark.parametrize(
    ("msg_type", "payload", "message"),
    [
        pytest.param(b"R", b"\x00\x00", "truncated", id="auth-short"),
        pytest.param(b"K", int32(1) + b"abc", "key length", id="key-3"),
        pytest.param(b"K", int32(1) + b"k" * 257, "key length", id="key-257"),
        pytest.param(b"K", b"\x00", "truncated", id="key-no-pid"),
        pytest.param(b"S", b"name\x00value", "terminator", id="paramstatus-no-nul"),
        pytest.param(b"S", b"a\x00b\x00c", "trailing", id="paramstatus-trailing"),
        pytest.param(b"Z", b"X", "invalid status", id="rfq-bad-status"),
        pytest.param(b"Z", b"", "invalid status", id="rfq-empty"),
        pytest.param(b"Z", b"II", "invalid status", id="rfq-two-bytes"),
        pytest.param(b"E", b"Cxx\x00", "truncated", id="error-no-terminator"),
        pytest.param(b"E", b"Cxx", "terminator", id="error-field-no-nul"),
        pytest.param(b"E", b"\x00junk", "trailing", id="error-trailing"),
        pytest.param(b"N", b"", "truncated", id="notice-empty"),
        pytest.param(b"C", b"SELECT 1", "terminator", id="complete-no-nul"),
        pytest.param(b"C", b"\xff\x00", "UTF-8", id="complete-bad-utf8"),
        pytest.param(b"v", int32(0) + int32(-1), "negative", id="negotiate-negative"),
        pytest.param(b"v", int32(0) + int32(2) + b"a\x00", "terminator", id="negotiate-short"),
        pytest.param(b"t", b"\x00\x02" + int32(23), "truncated", id="paramdesc-short"),
        pytest.param(b"D", b"\x00\x01" + int32(-2), "truncated", id="datarow-minus-two"),
        pytest.param(b"D", b"\x00\x01" + int32(4) + b"ab", "truncated", id="datarow-short"),
        pytest.param(b"D", b"\x00\x00x", "trailing", id="datarow-trailing"),
        pytest.param(b"T", b"\x00\x01id\x00" + b"\x00" * 17, "truncated", id="rowdesc-short"),
        pytest.param(b"T", b"\x00\x01id", "terminator", id="rowdesc-no-nul"),
        pytest.param(b"A", int32(1) + b"chan\x00", "terminator", id="notify-short"),
        pytest.param(b"G", b"\x00" + int16(-1), "negative", id="copyin-negative"),
        pytest.param(b"H", b"\x00" + int16(2) + int16(0), "truncated", id="copyout-short"),
        pytest.param(b"W", b"", "truncated", id="copyboth-empty"),
        pytest.param(b"1", b"x", "no payload", id="parsecomplete-payload"),
        pytest.param(b"s", b"\x00", "no payload", id="suspended-payload"),
        pytest.param(b"Q", b"", "unknown backend message", id="unknown-Q"),
        pytest.param(b"\xff", b"", "unknown backend message", id="unknown-ff"),
        pytest.param(b"p", b"", "unknown backend message", id="unknown-p"),
    ],
)
def test_malformed(msg_type: bytes, payload: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_backend(msg_type[0], payload)


def test_parameter_description_40000_round_trip() -> None:
    message = ParameterDescription((23,) * 40000)
    data = message.encode()
    assert decode_backend(data[0], data[5:]) == message


def test_parameter_description_decodes_unsigned_count() -> None:
    payload = struct.pack("!H", 40000) + int32(23) * 40000
    assert ParameterDescription.decode(payload).type_oids == (23,) * 40000
