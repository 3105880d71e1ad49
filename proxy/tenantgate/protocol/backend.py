"""Typed backend (server -> client) messages: decode from a payload, encode to bytes.

The proxy decodes only what it must inspect (ReadyForQuery, ErrorResponse,
ParameterStatus, authentication, BackendKeyData, CommandComplete); the rest is
forwarded as raw frames.  Every type still has a decoder so tests and tools can
read a whole conversation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from tenantgate.errors import PgError, RemoteProtocolError
from tenantgate.protocol.codec import INT16, INT32, UINT32, PayloadCursor, cstring, int32_list
from tenantgate.protocol.framing import frame

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12


@dataclass(frozen=True, slots=True)
class Authentication:
    TYPE: ClassVar[bytes] = b"R"
    code: int
    data: bytes = b""

    def encode(self) -> bytes:
        return frame(b"R", INT32.pack(self.code) + self.data)

    @classmethod
    def decode(cls, payload: bytes) -> Authentication:
        cursor = PayloadCursor(payload, "Authentication")
        return cls(cursor.int32(), cursor.rest())

    @classmethod
    def sasl(cls, mechanisms: tuple[str, ...]) -> Authentication:
        return cls(AUTH_SASL, b"".join(cstring(m) for m in mechanisms) + b"\x00")

    def sasl_mechanisms(self) -> tuple[str, ...]:
        cursor = PayloadCursor(self.data, "AuthenticationSASL")
        names: list[str] = []
        while (name := cursor.cstring()) != "":
            names.append(name)
        return tuple(names)


@dataclass(frozen=True, slots=True)
class BackendKeyData:
    TYPE: ClassVar[bytes] = b"K"
    process_id: int
    secret_key: bytes

    def encode(self) -> bytes:
        return frame(b"K", INT32.pack(self.process_id) + self.secret_key)

    @classmethod
    def decode(cls, payload: bytes) -> BackendKeyData:
        cursor = PayloadCursor(payload, "BackendKeyData")
        pid = cursor.int32()
        key = cursor.rest()
        if not 4 <= len(key) <= 256:
            raise RemoteProtocolError("BackendKeyData: invalid key length")
        return cls(pid, key)


@dataclass(frozen=True, slots=True)
class ParameterStatus:
    TYPE: ClassVar[bytes] = b"S"
    name: str
    value: str

    def encode(self) -> bytes:
        return frame(b"S", cstring(self.name) + cstring(self.value))

    @classmethod
    def decode(cls, payload: bytes) -> ParameterStatus:
        cursor = PayloadCursor(payload, "ParameterStatus")
        name, value = cursor.cstring(), cursor.cstring()
        cursor.expect_end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class ReadyForQuery:
    TYPE: ClassVar[bytes] = b"Z"
    status: str  # I, T or E

    def encode(self) -> bytes:
        return frame(b"Z", self.status.encode("ascii"))

    @classmethod
    def decode(cls, payload: bytes) -> ReadyForQuery:
        if len(payload) != 1 or payload not in (b"I", b"T", b"E"):
            raise RemoteProtocolError("ReadyForQuery: invalid status")
        return cls(payload.decode("ascii"))


@dataclass(frozen=True, slots=True)
class ErrorResponse:
    """ErrorResponse ('E') or, with ``notice=True``, NoticeResponse ('N')."""

    fields: tuple[tuple[str, str], ...]
    notice: bool = False

    def encode(self) -> bytes:
        body = b"".join(code.encode("ascii") + cstring(value) for code, value in self.fields)
        return frame(b"N" if self.notice else b"E", body + b"\x00")

    @classmethod
    def decode(cls, payload: bytes, notice: bool = False) -> ErrorResponse:
        cursor = PayloadCursor(payload, "ErrorResponse")
        fields: list[tuple[str, str]] = []
        while True:
            code = cursor.byte()
            if code == 0:
                break
            fields.append((chr(code), cursor.cstring()))
        cursor.expect_end()
        return cls(tuple(fields), notice)

    @classmethod
    def from_error(cls, error: PgError, notice: bool = False) -> ErrorResponse:
        return cls(tuple(error.fields()), notice)

    def get(self, code: str) -> str | None:
        for key, value in self.fields:
            if key == code:
                return value
        return None

    @property
    def sqlstate(self) -> str | None:
        return self.get("C")


@dataclass(frozen=True, slots=True)
class CommandComplete:
    TYPE: ClassVar[bytes] = b"C"
    tag: str

    def encode(self) -> bytes:
        return frame(b"C", cstring(self.tag))

    @classmethod
    def decode(cls, payload: bytes) -> CommandComplete:
        cursor = PayloadCursor(payload, "CommandComplete")
        tag = cursor.cstring()
        cursor.expect_end()
        return cls(tag)

    @property
    def rows(self) -> int | None:
        """Row count of the tag (SELECT n, INSERT 0 n, UPDATE n, COPY n ...), if any."""
        last = self.tag.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() and " " in self.tag else None


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion:
    TYPE: ClassVar[bytes] = b"v"
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    def encode(self) -> bytes:
        body = UINT32.pack(self.newest_minor) + INT32.pack(len(self.unrecognized))
        return frame(b"v", body + b"".join(cstring(o) for o in self.unrecognized))

    @classmethod
    def decode(cls, payload: bytes) -> NegotiateProtocolVersion:
        cursor = PayloadCursor(payload, "NegotiateProtocolVersion")
        minor = cursor.uint32()
        count = cursor.int32()
        if count < 0:
            raise RemoteProtocolError("NegotiateProtocolVersion: negative count")
        options = tuple(cursor.cstring() for _ in range(count))
        cursor.expect_end()
        return cls(minor, options)


@dataclass(frozen=True, slots=True)
class ParameterDescription:
    TYPE: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    def encode(self) -> bytes:
        return frame(b"t", int32_list(self.type_oids))

    @classmethod
    def decode(cls, payload: bytes) -> ParameterDescription:
        cursor = PayloadCursor(payload, "ParameterDescription")
        count = cursor.uint16()
        oids = tuple(cursor.uint32() for _ in range(count))
        cursor.expect_end()
        return cls(oids)


@dataclass(frozen=True, slots=True)
class DataRow:
    TYPE: ClassVar[bytes] = b"D"
    values: tuple[bytes | None, ...]

    def encode(self) -> bytes:
        parts = [INT16.pack(len(self.values))]
        for value in self.values:
            parts.append(INT32.pack(-1) if value is None else INT32.pack(len(value)) + value)
        return frame(b"D", b"".join(parts))

    @classmethod
    def decode(cls, payload: bytes) -> DataRow:
        cursor = PayloadCursor(payload, "DataRow")
        count = cursor.uint16()
        values: list[bytes | None] = []
        for _ in range(count):
            size = cursor.int32()
            values.append(None if size == -1 else cursor.take(size))
        cursor.expect_end()
        return cls(tuple(values))


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int
    column: int
    type_oid: int
    type_size: int
    type_modifier: int
    format: int


@dataclass(frozen=True, slots=True)
class RowDescription:
    TYPE: ClassVar[bytes] = b"T"
    fields: tuple[FieldDescription, ...]

    def encode(self) -> bytes:
        parts = [INT16.pack(len(self.fields))]
        for f in self.fields:
            parts.append(
                cstring(f.name)
                + UINT32.pack(f.table_oid)
                + INT16.pack(f.column)
                + UINT32.pack(f.type_oid)
                + INT16.pack(f.type_size)
                + INT32.pack(f.type_modifier)
                + INT16.pack(f.format)
            )
        return frame(b"T", b"".join(parts))

    @classmethod
    def decode(cls, payload: bytes) -> RowDescription:
        cursor = PayloadCursor(payload, "RowDescription")
        count = cursor.uint16()
        fields = tuple(
            FieldDescription(
                cursor.cstring(),
                cursor.uint32(),
                cursor.int16(),
                cursor.uint32(),
                cursor.int16(),
                cursor.int32(),
                cursor.int16(),
            )
            for _ in range(count)
        )
        cursor.expect_end()
        return cls(fields)


@dataclass(frozen=True, slots=True)
class NotificationResponse:
    TYPE: ClassVar[bytes] = b"A"
    process_id: int
    channel: str
    payload: str

    def encode(self) -> bytes:
        return frame(
            b"A", INT32.pack(self.process_id) + cstring(self.channel) + cstring(self.payload)
        )

    @classmethod
    def decode(cls, payload: bytes) -> NotificationResponse:
        cursor = PayloadCursor(payload, "NotificationResponse")
        pid = cursor.int32()
        channel, body = cursor.cstring(), cursor.cstring()
        cursor.expect_end()
        return cls(pid, channel, body)


@dataclass(frozen=True, slots=True)
class CopyResponse:
    """CopyInResponse ('G'), CopyOutResponse ('H') or CopyBothResponse ('W')."""

    kind: str
    overall_format: int
    column_formats: tuple[int, ...]

    def encode(self) -> bytes:
        body = bytes([self.overall_format]) + INT16.pack(len(self.column_formats))
        body += b"".join(INT16.pack(f) for f in self.column_formats)
        return frame(self.kind.encode("ascii"), body)

    @classmethod
    def decode(cls, kind: str, payload: bytes) -> CopyResponse:
        cursor = PayloadCursor(payload, "CopyResponse")
        overall = cursor.byte()
        count = cursor.int16()
        if count < 0:
            raise RemoteProtocolError("CopyResponse: negative count")
        formats = tuple(cursor.int16() for _ in range(count))
        cursor.expect_end()
        return cls(kind, overall, formats)


@dataclass(frozen=True, slots=True)
class Empty:
    """A message with no payload: ParseComplete '1', BindComplete '2', CloseComplete '3',
    NoData 'n', EmptyQueryResponse 'I', PortalSuspended 's', CopyDone 'c'."""

    kind: str

    def encode(self) -> bytes:
        return frame(self.kind.encode("ascii"))


@dataclass(frozen=True, slots=True)
class RawBackend:
    """A backend message kept as bytes (CopyData, FunctionCallResponse)."""

    kind: str
    payload: bytes

    def encode(self) -> bytes:
        return frame(self.kind.encode("ascii"), self.payload)


BackendMessage = (
    Authentication
    | BackendKeyData
    | ParameterStatus
    | ReadyForQuery
    | ErrorResponse
    | CommandComplete
    | NegotiateProtocolVersion
    | ParameterDescription
    | DataRow
    | RowDescription
    | NotificationResponse
    | CopyResponse
    | Empty
    | RawBackend
)

_EMPTY_TYPES = frozenset(b"123nIsc")


def decode_backend(msg_type: int, payload: bytes) -> BackendMessage:
    """Decode any backend message; unknown types are a protocol error."""
    kind = chr(msg_type)
    if msg_type in _EMPTY_TYPES:
        if payload:
            raise RemoteProtocolError(f"message {kind!r} must have no payload")
        return Empty(kind)
    decoders: dict[str, Callable[[bytes], BackendMessage]] = {
        "R": Authentication.decode,
        "K": BackendKeyData.decode,
        "S": ParameterStatus.decode,
        "Z": ReadyForQuery.decode,
        "C": CommandComplete.decode,
        "v": NegotiateProtocolVersion.decode,
        "t": ParameterDescription.decode,
        "D": DataRow.decode,
        "T": RowDescription.decode,
        "A": NotificationResponse.decode,
    }
    decoder = decoders.get(kind)
    if decoder is not None:
        return decoder(payload)
    if kind in ("E", "N"):
        return ErrorResponse.decode(payload, notice=kind == "N")
    if kind in ("G", "H", "W"):
        return CopyResponse.decode(kind, payload)
    if kind in ("d", "V"):
        return RawBackend(kind, payload)
    raise RemoteProtocolError(f"unknown backend message type {msg_type:#04x}")
