"""First packets a client may send: StartupMessage (3.0 and 3.2), SSLRequest,
GSSENCRequest and CancelRequest, decoded from a :class:`FirstPacketReader` body.
"""

from __future__ import annotations

from dataclasses import dataclass

from tenantgate.errors import RemoteProtocolError
from tenantgate.protocol.codec import INT32, UINT32, PayloadCursor, cstring
from tenantgate.protocol.framing import frame_first_packet

PROTOCOL_3_0 = 196608
PROTOCOL_3_2 = 196610
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
MIN_CANCEL_KEY = 4
MAX_CANCEL_KEY = 256


@dataclass(frozen=True, slots=True)
class StartupMessage:
    protocol: int
    parameters: tuple[tuple[str, str], ...]

    @property
    def major(self) -> int:
        return self.protocol >> 16

    @property
    def minor(self) -> int:
        return self.protocol & 0xFFFF

    def get(self, name: str) -> str | None:
        for key, value in self.parameters:
            if key == name:
                return value
        return None

    def encode(self) -> bytes:
        body = UINT32.pack(self.protocol)
        body += b"".join(cstring(k) + cstring(v) for k, v in self.parameters) + b"\x00"
        return frame_first_packet(body)


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return frame_first_packet(UINT32.pack(SSL_REQUEST_CODE))


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return frame_first_packet(UINT32.pack(GSSENC_REQUEST_CODE))


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        return frame_first_packet(
            UINT32.pack(CANCEL_REQUEST_CODE) + INT32.pack(self.process_id) + self.secret_key
        )


FirstPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_first_packet(body: bytes) -> FirstPacket:
    """Decode a first packet body (length word already removed)."""
    cursor = PayloadCursor(body, "startup packet")
    code = cursor.uint32()
    if code == SSL_REQUEST_CODE:
        cursor.expect_end()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        cursor.expect_end()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        pid = cursor.int32()
        key = cursor.rest()
        if not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
            raise RemoteProtocolError("cancel request: invalid key length")
        return CancelRequest(pid, key)
    if code >> 16 != 3:
        raise RemoteProtocolError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}")
    params: list[tuple[str, str]] = []
    seen: set[str] = set()
    while True:
        name = cursor.cstring()
        if name == "":
            break
        value = cursor.cstring()
        if name in seen:
            raise RemoteProtocolError(f"startup packet: duplicate parameter {name!r}")
        seen.add(name)
        params.append((name, value))
    cursor.expect_end()
    return StartupMessage(code, tuple(params))
