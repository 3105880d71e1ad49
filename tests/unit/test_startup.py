"""startup: the first packets (StartupMessage 3.0/3.2, SSLRequest, GSSENCRequest, CancelRequest)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from tenantgate.errors import LocalProtocolError, RemoteProtocolError
from tenantgate.protocol.framing import FirstPacketReader, frame, frame_first_packet
from tenantgate.protocol.startup import (
    CANCEL_REQUEST_CODE,
    GSSENC_REQUEST_CODE,
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

STARTUP_30 = StartupMessage(
    PROTOCOL_3_0,
    (("user", "acme_app"), ("database", "app"), ("application_name", "psql ✓")),
)
STARTUP_32 = StartupMessage(PROTOCOL_3_2, (("user", ""), ("options", "-c x=1")))
PACKETS: list[FirstPacket] = [
    STARTUP_30,
    STARTUP_32,
    StartupMessage(PROTOCOL_3_0, ()),
    SSLRequest(),
    GSSENCRequest(),
    CancelRequest(1234, b"\x01\x02\x03\x04"),
    CancelRequest(-7, bytes(range(32))),
    CancelRequest(0x7FFFFFFF, b"k" * 256),
]
TRAILING = frame(b"Q", b"SELECT 1\x00")


def read_all(chunks: list[bytes]) -> tuple[list[FirstPacket], bytes]:
    reader = FirstPacketReader()
    out: list[FirstPacket] = []
    for chunk in chunks:
        reader.feed(chunk)
        if not out and (body := reader.next_packet()) is not None:
            out.append(decode_first_packet(body))
    return out, reader.trailing


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("split", [whole, bytewise])
@pytest.mark.parametrize("packet", PACKETS, ids=repr)
def test_round_trip_whole_bytewise_trailing(
    packet: FirstPacket, split: Callable[[bytes], list[bytes]]
) -> None:
    data = packet.encode()
    assert read_all(split(data)) == ([packet], b"")
    assert read_all(split(data + TRAILING)) == ([packet], TRAILING)


def test_wire_layout_of_fixed_requests() -> None:
    assert SSLRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert GSSENCRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert CancelRequest(5, b"abcd").encode() == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x05abcd"
    )


def test_startup_encoding_layout() -> None:
    data = StartupMessage(PROTOCOL_3_0, (("user", "u"),)).encode()
    assert data == b"\x00\x00\x00\x10\x00\x03\x00\x00user\x00u\x00\x00"


def test_startup_accessors() -> None:
    assert (STARTUP_30.major, STARTUP_30.minor) == (3, 0)
    assert (STARTUP_32.major, STARTUP_32.minor) == (3, 2)
    assert STARTUP_30.get("database") == "app"
    assert STARTUP_30.get("application_name") == "psql ✓"
    assert STARTUP_30.get("missing") is None
    assert STARTUP_32.get("user") == ""


def test_startup_preserves_parameter_order() -> None:
    params = tuple((f"p{i}", str(i)) for i in range(20))
    body = StartupMessage(PROTOCOL_3_0, params).encode()[4:]
    decoded = decode_first_packet(body)
    assert isinstance(decoded, StartupMessage)
    assert decoded.parameters == params


def test_startup_packet_over_limit_is_refused() -> None:
    big = StartupMessage(PROTOCOL_3_0, (("user", "u"), ("application_name", "x" * 10000)))
    reader = FirstPacketReader()
    reader.feed(big.encode()[:4])  # the length word alone is enough to refuse
    with pytest.raises(RemoteProtocolError):
        reader.next_packet()


def test_startup_packet_at_limit_is_accepted() -> None:
    fixed = len(StartupMessage(PROTOCOL_3_0, (("user", "u"), ("a", ""))).encode())
    packet = StartupMessage(PROTOCOL_3_0, (("user", "u"), ("a", "x" * (10000 - fixed))))
    data = packet.encode()
    assert len(data) == 10000
    assert read_all([data]) == ([packet], b"")


def test_encode_refuses_nul_in_parameter() -> None:
    with pytest.raises(LocalProtocolError):
        StartupMessage(PROTOCOL_3_0, (("user", "a\x00b"),)).encode()


def code(value: int) -> bytes:
    return struct.pack("!I", value)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"", "truncated", id="empty"),
        pytest.param(b"\x00\x03", "truncated", id="short-code"),
        pytest.param(code(0x00020000) + b"\x00", "unsupported frontend protocol 2.0", id="v2"),
        pytest.param(code(0x00040000) + b"\x00", "unsupported frontend protocol 4.0", id="v4"),
        pytest.param(code(1234 << 16 | 5000) + b"\x00", "unsupported", id="unknown-code"),
        pytest.param(code(PROTOCOL_3_0), "terminator", id="no-param-terminator"),
        pytest.param(code(PROTOCOL_3_0) + b"user\x00bob", "terminator", id="value-no-nul"),
        pytest.param(code(PROTOCOL_3_0) + b"user\x00bob\x00", "terminator", id="no-final-nul"),
        pytest.param(code(PROTOCOL_3_0) + b"user\x00\xff\xfe\x00\x00", "UTF-8", id="bad-utf8"),
        pytest.param(
            code(PROTOCOL_3_0) + b"user\x00a\x00user\x00b\x00\x00", "duplicate", id="duplicate"
        ),
        pytest.param(code(PROTOCOL_3_0) + b"user\x00a\x00\x00junk", "trailing", id="trailing"),
        pytest.param(code(SSL_REQUEST_CODE) + b"\x00", "trailing", id="ssl-extra"),
        pytest.param(code(GSSENC_REQUEST_CODE) + b"x", "trailing", id="gss-extra"),
        pytest.param(code(CANCEL_REQUEST_CODE) + b"\x00\x00", "truncated", id="cancel-no-pid"),
        pytest.param(code(CANCEL_REQUEST_CODE) + b"\x00" * 4 + b"abc", "key length", id="key-3"),
        pytest.param(code(CANCEL_REQUEST_CODE) + b"\x00" * 4, "key length", id="key-0"),
        pytest.param(
            code(CANCEL_REQUEST_CODE) + b"\x00" * 4 + b"k" * 257, "key length", id="key-257"
        ),
    ],
)
def test_malformed_first_packets(body: bytes, message: str) -> None:
    with pytest.raises(RemoteProtocolError, match=message):
        decode_first_packet(body)


def test_malformed_packet_through_reader() -> None:
    reader = FirstPacketReader()
    reader.feed(frame_first_packet(code(PROTOCOL_3_0) + b"user"))
    body = reader.next_packet()
    assert body is not None
    with pytest.raises(RemoteProtocolError):
        decode_first_packet(body)
