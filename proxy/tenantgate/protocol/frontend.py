"""Typed frontend (client -> server) messages: decode from a payload, encode to bytes.

Covers every message a client may send after startup: Query, Parse, Bind,
Execute, Describe, Close, Sync, Flush, Terminate, CopyData/CopyDone/CopyFail,
FunctionCall, and the authentication responses ('p').

The messages are plain classes on :class:`_Message` (value equality, hash and
repr over :attr:`_Message.FIELDS`), not dataclasses: mypyc compiles this module,
and it would leave a dataclass's generated ``__init__`` interpreted, which every
Parse and Bind of every client calls.  Treat them as immutable values; the type
checker does (their attributes are ``Final``).
"""

from __future__ import annotations

from typing import ClassVar, Final

from tenantgate.errors import RemoteProtocolError
from tenantgate.protocol.codec import (
    INT32,
    UINT32,
    PayloadCursor,
    count16,
    cstring,
    int16_list,
    int32_list,
)
from tenantgate.protocol.framing import frame, uint32_at


class _Message:
    """Value semantics for the messages below: equal, and hashing alike, when of one
    class with equal :attr:`FIELDS`."""

    __slots__ = ()
    TYPE: ClassVar[bytes] = b""
    FIELDS: ClassVar[tuple[str, ...]] = ()

    def values(self) -> tuple[object, ...]:
        """The message's fields, in :attr:`FIELDS` order."""
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, _Message)
        return self.values() == other.values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({fields})"


class Query(_Message):
    FIELDS: ClassVar[tuple[str, ...]] = ("query",)
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"Q"

    def __init__(self, query: str) -> None:
        self.query: Final = query

    def encode(self) -> bytes:
        return frame(b"Q", cstring(self.query))

    @staticmethod
    def decode(payload: bytes) -> Query:
        cursor = PayloadCursor(payload, "Query")
        query = cursor.cstring()
        cursor.expect_end()
        return Query(query)


class Parse(_Message):
    FIELDS: ClassVar[tuple[str, ...]] = ("name", "query", "param_types")
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"P"

    def __init__(self, name: str, query: str, param_types: tuple[int, ...] = ()) -> None:
        self.name: Final = name
        self.query: Final = query
        self.param_types: Final = param_types

    def encode(self) -> bytes:
        return frame(b"P", cstring(self.name) + cstring(self.query) + int32_list(self.param_types))

    @staticmethod
    def decode(payload: bytes) -> Parse:
        # Hot path (drivers Parse the unnamed statement for every statement): two C
        # strings and no parameter types; anything else takes the cursor.
        first = payload.find(0)
        second = payload.find(0, first + 1) if first >= 0 else -1
        if second >= 0 and payload[second + 1 :] == b"\x00\x00":
            try:
                name = payload[:first].decode("utf-8")
                return Parse(name, payload[first + 1 : second].decode("utf-8"), ())
            except UnicodeDecodeError:
                pass  # the cursor reports it precisely
        cursor = PayloadCursor(payload, "Parse")
        name = cursor.cstring()
        query = cursor.cstring()
        count = cursor.uint16()
        types = tuple(cursor.uint32() for _ in range(count))
        cursor.expect_end()
        return Parse(name, query, types)


class Bind(_Message):
    FIELDS: ClassVar[tuple[str, ...]] = (
        "portal",
        "statement",
        "param_formats",
        "params",
        "result_formats",
    )
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"B"

    def __init__(
        self,
        portal: str,
        statement: str,
        param_formats: tuple[int, ...] = (),
        params: tuple[bytes | None, ...] = (),
        result_formats: tuple[int, ...] = (),
    ) -> None:
        self.portal: Final = portal
        self.statement: Final = statement
        self.param_formats: Final = param_formats
        self.params: Final = params
        self.result_formats: Final = result_formats

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

    @staticmethod
    def decode(payload: bytes) -> Bind:
        # Hot path (every Bind of every client): fields read by indexing the bytes,
        # which compiles to plain C; the same checks as PayloadCursor would make.
        try:
            end = _terminator(payload, 0)
            portal = payload[:end].decode("utf-8") if end else ""
            start = end + 1
            end = _terminator(payload, start)
            statement = payload[start:end].decode("utf-8") if end > start else ""
            formats, pos = _int16_array(payload, end + 1)
            count = _uint16_at(payload, pos)
            pos += 2
            params: list[bytes | None] = []
            for _ in range(count):
                size = _int32_at(payload, pos)
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
            results, pos = _int16_array(payload, pos)
        except (ValueError, IndexError):  # no terminator, bad UTF-8, or short
            raise RemoteProtocolError("Bind: truncated or malformed message") from None
        if pos != len(payload):
            raise RemoteProtocolError("Bind: unexpected trailing bytes")
        return Bind(portal, statement, formats, tuple(params), results)

    def param_is_binary(self, index: int) -> bool:
        """Whether parameter ``index`` (0-based) is in binary format."""
        if not self.param_formats:
            return False
        if len(self.param_formats) == 1:
            return self.param_formats[0] == 1
        return index < len(self.param_formats) and self.param_formats[index] == 1


def bind_params_at(
    payload: bytes, pos: int, numbers: tuple[int, ...]
) -> list[tuple[bytes | None, bool]] | None:
    """Parameters ``numbers`` ($n, ascending) of a Bind, read in place.

    ``pos`` is where the Bind's parameter-format codes start (after its two
    names).  Each wanted parameter comes as (value or None for NULL, whether
    it is in binary format), as :meth:`Bind.param_is_binary` reads it.  None
    when the rest of the message is not exactly what :meth:`Bind.decode`
    accepts, or a wanted parameter is missing: the caller then goes the
    general way, which reports or refuses it.  No Bind, params tuple or
    format lists are built: this is the per-statement check of a prepared
    statement.
    """
    size = len(payload)
    found: list[tuple[bytes | None, bool]] = []
    wanted = len(numbers)
    try:
        format_count = _uint16_at(payload, pos)
        formats_at = pos + 2
        pos = formats_at + 2 * format_count
        count = _uint16_at(payload, pos)
        pos += 2
        for index in range(count):
            length = _int32_at(payload, pos)
            pos += 4
            if length < -1 or pos + length > size:
                return None
            if len(found) < wanted and numbers[len(found)] == index + 1:
                value = None if length == -1 else payload[pos : pos + length]
                if format_count == 1:
                    binary = _uint16_at(payload, formats_at) == 1
                else:
                    binary = (
                        index < format_count and _uint16_at(payload, formats_at + 2 * index) == 1
                    )
                found.append((value, binary))
            if length > 0:
                pos += length
        pos += 2 + 2 * _uint16_at(payload, pos)  # the result-format codes
    except IndexError:
        return None
    if pos != size or len(found) != wanted:
        return None
    return found


def _terminator(data: bytes, start: int) -> int:
    """Where the NUL ending the C string at ``start`` is (IndexError if none).

    A loop over the bytes, not ``bytes.index``: names are short (libpq's are
    empty or a few characters), and the loop compiles to plain C where the
    method call would not.
    """
    end = start
    while data[end] != 0:
        end += 1
    return end


def _uint16_at(data: bytes, pos: int) -> int:
    return (data[pos] << 8) | data[pos + 1]


def _int32_at(data: bytes, pos: int) -> int:
    value = uint32_at(data, pos)
    return value - 0x1_0000_0000 if value & 0x8000_0000 else value


def _int16_array(data: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    """The Int16 count and values at ``pos``, and the position after them."""
    count = _uint16_at(data, pos)
    end = pos + 2 + 2 * count
    if end > len(data):
        raise IndexError(pos)
    if count == 0:  # most Binds: no list to build
        return (), end
    values = []
    for at in range(pos + 2, end, 2):
        value = _uint16_at(data, at)
        values.append(value - 0x1_0000 if value & 0x8000 else value)
    return tuple(values), end


class Execute(_Message):
    FIELDS: ClassVar[tuple[str, ...]] = ("portal", "max_rows")
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"E"

    def __init__(self, portal: str = "", max_rows: int = 0) -> None:
        self.portal: Final = portal
        self.max_rows: Final = max_rows

    def encode(self) -> bytes:
        return frame(b"E", cstring(self.portal) + INT32.pack(self.max_rows))

    @staticmethod
    def decode(payload: bytes) -> Execute:
        if payload == _EXECUTE_UNNAMED_ALL:
            return _UNNAMED_EXECUTE  # what drivers send for nearly every statement
        cursor = PayloadCursor(payload, "Execute")
        portal = cursor.cstring()
        rows = cursor.int32()
        cursor.expect_end()
        return Execute(portal, rows)


class Describe(_Message):
    FIELDS: ClassVar[tuple[str, ...]] = ("kind", "name")
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"D"

    def __init__(self, kind: str, name: str = "") -> None:
        self.kind: Final = kind  # "S" statement or "P" portal
        self.name: Final = name

    def encode(self) -> bytes:
        return frame(b"D", self.kind.encode("ascii") + cstring(self.name))

    @staticmethod
    def decode(payload: bytes) -> Describe:
        if payload == b"P\x00":
            return _UNNAMED_PORTAL_DESCRIBE  # what libpq sends before every Execute
        cursor = PayloadCursor(payload, "Describe")
        kind = _statement_or_portal(cursor.byte(), "Describe")
        name = cursor.cstring()
        cursor.expect_end()
        return Describe(kind, name)


_EXECUTE_UNNAMED_ALL: Final = b"\x00\x00\x00\x00\x00"
_UNNAMED_EXECUTE: Final = Execute("", 0)
_UNNAMED_PORTAL_DESCRIBE: Final = Describe("P", "")


class Close(_Message):
    FIELDS: ClassVar[tuple[str, ...]] = ("kind", "name")
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"C"

    def __init__(self, kind: str, name: str = "") -> None:
        self.kind: Final = kind
        self.name: Final = name

    def encode(self) -> bytes:
        return frame(b"C", self.kind.encode("ascii") + cstring(self.name))

    @staticmethod
    def decode(payload: bytes) -> Close:
        cursor = PayloadCursor(payload, "Close")
        kind = _statement_or_portal(cursor.byte(), "Close")
        name = cursor.cstring()
        cursor.expect_end()
        return Close(kind, name)


def _statement_or_portal(value: int, what: str) -> str:
    if value not in (ord("S"), ord("P")):
        raise RemoteProtocolError(f"{what}: kind must be 'S' or 'P'")
    return chr(value)


class Sync(_Message):
    __slots__ = ()
    TYPE: ClassVar[bytes] = b"S"

    def encode(self) -> bytes:
        return frame(b"S")


class Flush(_Message):
    __slots__ = ()
    TYPE: ClassVar[bytes] = b"H"

    def encode(self) -> bytes:
        return frame(b"H")


class Terminate(_Message):
    __slots__ = ()
    TYPE: ClassVar[bytes] = b"X"

    def encode(self) -> bytes:
        return frame(b"X")


class CopyData(_Message):
    FIELDS: ClassVar[tuple[str, ...]] = ("data",)
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"d"

    def __init__(self, data: bytes) -> None:
        self.data: Final = data

    def encode(self) -> bytes:
        return frame(b"d", self.data)


class CopyDone(_Message):
    __slots__ = ()
    TYPE: ClassVar[bytes] = b"c"

    def encode(self) -> bytes:
        return frame(b"c")


class CopyFail(_Message):
    FIELDS: ClassVar[tuple[str, ...]] = ("message",)
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"f"

    def __init__(self, message: str) -> None:
        self.message: Final = message

    def encode(self) -> bytes:
        return frame(b"f", cstring(self.message))

    @staticmethod
    def decode(payload: bytes) -> CopyFail:
        cursor = PayloadCursor(payload, "CopyFail")
        message = cursor.cstring()
        cursor.expect_end()
        return CopyFail(message)


class FunctionCall(_Message):
    """Decoded only so it can be named in errors; the proxy never forwards it."""

    FIELDS: ClassVar[tuple[str, ...]] = ("function_oid", "raw_arguments")
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"F"

    def __init__(self, function_oid: int, raw_arguments: bytes) -> None:
        self.function_oid: Final = function_oid
        self.raw_arguments: Final = raw_arguments

    def encode(self) -> bytes:
        return frame(b"F", UINT32.pack(self.function_oid) + self.raw_arguments)

    @staticmethod
    def decode(payload: bytes) -> FunctionCall:
        cursor = PayloadCursor(payload, "FunctionCall")
        oid = cursor.uint32()
        return FunctionCall(oid, cursor.rest())


class PasswordMessage(_Message):
    """'p': PasswordMessage, SASLInitialResponse or SASLResponse (context decides)."""

    FIELDS: ClassVar[tuple[str, ...]] = ("data",)
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"p"

    def __init__(self, data: bytes) -> None:
        self.data: Final = data

    def encode(self) -> bytes:
        return frame(b"p", self.data)


class SASLInitialResponse(_Message):
    FIELDS: ClassVar[tuple[str, ...]] = ("mechanism", "response")
    __slots__ = FIELDS
    TYPE: ClassVar[bytes] = b"p"

    def __init__(self, mechanism: str, response: bytes | None) -> None:
        self.mechanism: Final = mechanism
        self.response: Final = response

    def encode(self) -> bytes:
        body = cstring(self.mechanism)
        if self.response is None:
            body += INT32.pack(-1)
        else:
            body += INT32.pack(len(self.response)) + self.response
        return frame(b"p", body)

    @staticmethod
    def decode(payload: bytes) -> SASLInitialResponse:
        cursor = PayloadCursor(payload, "SASLInitialResponse")
        mechanism = cursor.cstring()
        size = cursor.int32()
        response = None if size == -1 else cursor.take(size)
        cursor.expect_end()
        return SASLInitialResponse(mechanism, response)


NO_PAYLOAD_TYPES: Final = frozenset(b"SHXc")


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
