"""Typed frontend (client -> server) messages: decode from a payload, encode to bytes.

Covers every message a client may send after startup: Query, Parse, Bind,
Execute, Describe, Close, Sync, Flush, Terminate, CopyData/CopyDone/CopyFail,
FunctionCall, and the authentication responses ('p').
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

from tenantgate.errors import RemoteProtocolError
from tenantgate.protocol.codec import (
    INT32,
    UINT16,
    UINT32,
    PayloadCursor,
    count16,
    cstring,
    int16_list,
    int32_list,
)
from tenantgate.protocol.framing import frame


@dataclass(frozen=True, slots=True)
class Query:
    TYPE: ClassVar[bytes] = b"Q"
    query: str

    def encode(self) -> bytes:
        return frame(b"Q", cstring(self.query))

    @classmethod
    def decode(cls, payload: bytes) -> Query:
        cursor = PayloadCursor(payload, "Query")
        query = cursor.cstring()
        cursor.expect_end()
        return cls(query)


@dataclass(frozen=True, slots=True)
class Parse:
    TYPE: ClassVar[bytes] = b"P"
    name: str
    query: str
    param_types: tuple[int, ...] = ()

    def encode(self) -> bytes:
        return frame(b"P", cstring(self.name) + cstring(self.query) + int32_list(self.param_types))

    @classmethod
    def decode(cls, payload: bytes) -> Parse:
        # Hot path (drivers Parse the unnamed statement for every statement): two C
        # strings and no parameter types; anything else takes the cursor.
        first = payload.find(0)
        second = payload.find(0, first + 1) if first >= 0 else -1
        if second >= 0 and payload[second + 1 :] == b"\x00\x00":
            try:
                name = payload[:first].decode("utf-8")
                return cls(name, payload[first + 1 : second].decode("utf-8"), ())
            except UnicodeDecodeError:
                pass  # the cursor reports it precisely
        cursor = PayloadCursor(payload, "Parse")
        name = cursor.cstring()
        query = cursor.cstring()
        count = cursor.uint16()
        types = tuple(cursor.uint32() for _ in range(count))
        cursor.expect_end()
        return cls(name, query, types)


@dataclass(frozen=True, slots=True)
class Bind:
    TYPE: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode(self) -> bytes:
        parts = [cstring(self.portal), cstring(self.statement), int16_list(self.param_formats)]
        parts.append(count16(len(self.params)))
        for value in self.params:
            if value is None:
                parts.append(INT32.pack(-1))
            else:
                parts.append(INT32.pack(len(value)) + value)
        parts.append(int16_list(self.result_formats))
        return frame(b"B", b"".join(parts))

    @classmethod
    def decode(cls, payload: bytes) -> Bind:
        # Hot path (every Bind of every client): plain struct calls, same checks
        # as PayloadCursor would make.
        try:
            end = payload.index(0)
            portal = payload[:end].decode("utf-8")
            start = end + 1
            end = payload.index(0, start)
            statement = payload[start:end].decode("utf-8")
            pos = end + 1
            (count,) = UINT16.unpack_from(payload, pos)
            formats = struct.unpack_from(f"!{count}h", payload, pos + 2) if count else ()
            pos += 2 + 2 * count
            (count,) = UINT16.unpack_from(payload, pos)
            pos += 2
            params: list[bytes | None] = []
            for _ in range(count):
                (size,) = INT32.unpack_from(payload, pos)
                pos += 4
                if size == -1:
                    params.append(None)
                    continue
                if size < -1:
                    raise RemoteProtocolError("Bind: invalid parameter length")
                if pos + size > len(payload):
                    raise RemoteProtocolError("Bind: truncated message")
                params.append(payload[pos : pos + size])
                pos += size
            (count,) = UINT16.unpack_from(payload, pos)
            results = struct.unpack_from(f"!{count}h", payload, pos + 2) if count else ()
            pos += 2 + 2 * count
        except (ValueError, struct.error):
            raise RemoteProtocolError("Bind: truncated or malformed message") from None
        if pos != len(payload):
            raise RemoteProtocolError("Bind: unexpected trailing bytes")
        return cls(portal, statement, formats, tuple(params), results)

    def param_is_binary(self, index: int) -> bool:
        """Whether parameter ``index`` (0-based) is in binary format."""
        if not self.param_formats:
            return False
        if len(self.param_formats) == 1:
            return self.param_formats[0] == 1
        return index < len(self.param_formats) and self.param_formats[index] == 1


def _int16s(cursor: PayloadCursor, what: str) -> tuple[int, ...]:
    count = cursor.uint16()
    return tuple(cursor.int16() for _ in range(count))


@dataclass(frozen=True, slots=True)
class Execute:
    TYPE: ClassVar[bytes] = b"E"
    portal: str = ""
    max_rows: int = 0

    def encode(self) -> bytes:
        return frame(b"E", cstring(self.portal) + INT32.pack(self.max_rows))

    @classmethod
    def decode(cls, payload: bytes) -> Execute:
        if payload == _EXECUTE_UNNAMED_ALL:
            return _UNNAMED_EXECUTE  # what drivers send for nearly every statement
        cursor = PayloadCursor(payload, "Execute")
        portal = cursor.cstring()
        rows = cursor.int32()
        cursor.expect_end()
        return cls(portal, rows)


@dataclass(frozen=True, slots=True)
class Describe:
    TYPE: ClassVar[bytes] = b"D"
    kind: str  # "S" statement or "P" portal
    name: str = ""

    def encode(self) -> bytes:
        return frame(b"D", self.kind.encode("ascii") + cstring(self.name))

    @classmethod
    def decode(cls, payload: bytes) -> Describe:
        if payload == b"P\x00":
            return _UNNAMED_PORTAL_DESCRIBE  # what libpq sends before every Execute
        cursor = PayloadCursor(payload, "Describe")
        kind = _statement_or_portal(cursor.byte(), "Describe")
        name = cursor.cstring()
        cursor.expect_end()
        return cls(kind, name)


_EXECUTE_UNNAMED_ALL = b"\x00\x00\x00\x00\x00"
_UNNAMED_EXECUTE = Execute("", 0)
_UNNAMED_PORTAL_DESCRIBE = Describe("P", "")


@dataclass(frozen=True, slots=True)
class Close:
    TYPE: ClassVar[bytes] = b"C"
    kind: str
    name: str = ""

    def encode(self) -> bytes:
        return frame(b"C", self.kind.encode("ascii") + cstring(self.name))

    @classmethod
    def decode(cls, payload: bytes) -> Close:
        cursor = PayloadCursor(payload, "Close")
        kind = _statement_or_portal(cursor.byte(), "Close")
        name = cursor.cstring()
        cursor.expect_end()
        return cls(kind, name)


def _statement_or_portal(value: int, what: str) -> str:
    if value not in (ord("S"), ord("P")):
        raise RemoteProtocolError(f"{what}: kind must be 'S' or 'P'")
    return chr(value)


@dataclass(frozen=True, slots=True)
class Sync:
    TYPE: ClassVar[bytes] = b"S"

    def encode(self) -> bytes:
        return frame(b"S")


@dataclass(frozen=True, slots=True)
class Flush:
    TYPE: ClassVar[bytes] = b"H"

    def encode(self) -> bytes:
        return frame(b"H")


@dataclass(frozen=True, slots=True)
class Terminate:
    TYPE: ClassVar[bytes] = b"X"

    def encode(self) -> bytes:
        return frame(b"X")


@dataclass(frozen=True, slots=True)
class CopyData:
    TYPE: ClassVar[bytes] = b"d"
    data: bytes

    def encode(self) -> bytes:
        return frame(b"d", self.data)


@dataclass(frozen=True, slots=True)
class CopyDone:
    TYPE: ClassVar[bytes] = b"c"

    def encode(self) -> bytes:
        return frame(b"c")


@dataclass(frozen=True, slots=True)
class CopyFail:
    TYPE: ClassVar[bytes] = b"f"
    message: str

    def encode(self) -> bytes:
        return frame(b"f", cstring(self.message))

    @classmethod
    def decode(cls, payload: bytes) -> CopyFail:
        cursor = PayloadCursor(payload, "CopyFail")
        message = cursor.cstring()
        cursor.expect_end()
        return cls(message)


@dataclass(frozen=True, slots=True)
class FunctionCall:
    """Decoded only so it can be named in errors; the proxy never forwards it."""

    TYPE: ClassVar[bytes] = b"F"
    function_oid: int
    raw_arguments: bytes

    def encode(self) -> bytes:
        return frame(b"F", UINT32.pack(self.function_oid) + self.raw_arguments)

    @classmethod
    def decode(cls, payload: bytes) -> FunctionCall:
        cursor = PayloadCursor(payload, "FunctionCall")
        oid = cursor.uint32()
        return cls(oid, cursor.rest())


@dataclass(frozen=True, slots=True)
class PasswordMessage:
    """'p': PasswordMessage, SASLInitialResponse or SASLResponse (context decides)."""

    TYPE: ClassVar[bytes] = b"p"
    data: bytes

    def encode(self) -> bytes:
        return frame(b"p", self.data)


@dataclass(frozen=True, slots=True)
class SASLInitialResponse:
    mechanism: str
    response: bytes | None

    def encode(self) -> bytes:
        body = cstring(self.mechanism)
        if self.response is None:
            body += INT32.pack(-1)
        else:
            body += INT32.pack(len(self.response)) + self.response
        return frame(b"p", body)

    @classmethod
    def decode(cls, payload: bytes) -> SASLInitialResponse:
        cursor = PayloadCursor(payload, "SASLInitialResponse")
        mechanism = cursor.cstring()
        size = cursor.int32()
        response = None if size == -1 else cursor.take(size)
        cursor.expect_end()
        return cls(mechanism, response)


NO_PAYLOAD_TYPES = frozenset(b"SHXc")


FrontendMessage = (
    Query
    | Parse
    | Bind
    | Execute
    | Describe
    | Close
    | Sync
    | Flush
    | Terminate
    | CopyData
    | CopyDone
    | CopyFail
    | FunctionCall
    | PasswordMessage
)


def decode_frontend(msg_type: int, payload: bytes) -> FrontendMessage:
    """Decode any post-startup frontend message; unknown types are a protocol error."""
    if msg_type in NO_PAYLOAD_TYPES and payload:
        raise RemoteProtocolError(f"message {chr(msg_type)!r} must have no payload")
    match msg_type:
        case 0x51:  # Q
            return Query.decode(payload)
        case 0x50:  # P
            return Parse.decode(payload)
        case 0x42:  # B
            return Bind.decode(payload)
        case 0x45:  # E
            return Execute.decode(payload)
        case 0x44:  # D
            return Describe.decode(payload)
        case 0x43:  # C
            return Close.decode(payload)
        case 0x53:  # S
            return Sync()
        case 0x48:  # H
            return Flush()
        case 0x58:  # X
            return Terminate()
        case 0x64:  # d
            return CopyData(payload)
        case 0x63:  # c
            return CopyDone()
        case 0x66:  # f
            return CopyFail.decode(payload)
        case 0x46:  # F
            return FunctionCall.decode(payload)
        case 0x70:  # p
            return PasswordMessage(payload)
    raise RemoteProtocolError(f"unknown frontend message type {msg_type:#04x}")
