"""Low-level field codec shared by the message modules: Int16/Int32, C strings, bytes.

A :class:`PayloadCursor` walks one message payload and raises
:class:`RemoteProtocolError` on any truncation or missing terminator; builders
on the other side produce the same field forms.
"""

from __future__ import annotations

import struct

from tenantgate.errors import LocalProtocolError, RemoteProtocolError

INT16 = struct.Struct("!h")
UINT16 = struct.Struct("!H")
INT32 = struct.Struct("!i")
UINT32 = struct.Struct("!I")


class PayloadCursor:
    """Reads fields from one message payload, front to back."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _need(self, size: int) -> int:
        start = self._pos
        if size < 0 or start + size > len(self._data):
            raise RemoteProtocolError(f"{self._what}: truncated message")
        self._pos = start + size
        return start

    def int16(self) -> int:
        value: int = INT16.unpack_from(self._data, self._need(2))[0]
        return value

    def uint16(self) -> int:
        value: int = UINT16.unpack_from(self._data, self._need(2))[0]
        return value

    def int32(self) -> int:
        value: int = INT32.unpack_from(self._data, self._need(4))[0]
        return value

    def uint32(self) -> int:
        value: int = UINT32.unpack_from(self._data, self._need(4))[0]
        return value

    def byte(self) -> int:
        return self._data[self._need(1)]

    def take(self, size: int) -> bytes:
        start = self._need(size)
        return self._data[start : start + size]

    def cstring_bytes(self) -> bytes:
        end = self._data.find(b"\x00", self._pos)
        if end < 0:
            raise RemoteProtocolError(f"{self._what}: string without terminator")
        value = self._data[self._pos : end]
        self._pos = end + 1
        return value

    def cstring(self) -> str:
        raw = self.cstring_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError(f"{self._what}: string is not valid UTF-8") from None

    def rest(self) -> bytes:
        value = self._data[self._pos :]
        self._pos = len(self._data)
        return value

    @property
    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def expect_end(self) -> None:
        if self._pos != len(self._data):
            raise RemoteProtocolError(f"{self._what}: unexpected trailing bytes")


def cstring(value: str | bytes) -> bytes:
    """Encode a NUL-terminated string; refuse embedded NULs."""
    raw = value.encode("utf-8") if isinstance(value, str) else value
    if b"\x00" in raw:
        raise LocalProtocolError("strings on the wire cannot contain NUL bytes")
    return raw + b"\x00"


def count16(count: int) -> bytes:
    """An Int16 count as PostgreSQL reads it: unsigned, up to 65535."""
    if not 0 <= count <= 0xFFFF:
        raise LocalProtocolError("too many values for an Int16 count")
    return UINT16.pack(count)


def int16_list(values: tuple[int, ...]) -> bytes:
    return count16(len(values)) + b"".join(INT16.pack(v) for v in values)


def int32_list(values: tuple[int, ...]) -> bytes:
    return count16(len(values)) + b"".join(UINT32.pack(v) for v in values)
