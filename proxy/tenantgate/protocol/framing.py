"""Framing: splitting a byte stream into messages, with size limits.

Owns the two framings of the protocol: the untyped first packet (Int32 length
including itself, then the body) and the typed message (1 type byte, Int32
length including itself but not the type byte).  Both readers are incremental:
feed any number of bytes, then take complete frames; a length header beyond
the configured cap is a :class:`RemoteProtocolError` before any payload is
buffered, so a 2 GiB header cannot cost 2 GiB of memory.
"""

from __future__ import annotations

import struct

from tenantgate.errors import RemoteProtocolError

MAX_STARTUP_PACKET = 10000
DEFAULT_MAX_MESSAGE = 64 * 1024 * 1024
_HEADER = struct.Struct("!cI")
_INT32 = struct.Struct("!I")


class FirstPacketReader:
    """Reads one untyped first packet (StartupMessage, SSLRequest, CancelRequest...)."""

    __slots__ = ("_buffer", "_max_size")

    def __init__(self, max_size: int = MAX_STARTUP_PACKET) -> None:
        self._buffer = bytearray()
        self._max_size = max_size

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_packet(self) -> bytes | None:
        """The body (without the length word) of the next complete packet, or None."""
        if len(self._buffer) < 4:
            return None
        (length,) = _INT32.unpack_from(self._buffer, 0)
        if length < 8 or length > self._max_size:
            raise RemoteProtocolError(f"invalid startup packet length {length}")
        if len(self._buffer) < length:
            return None
        body = bytes(self._buffer[4:length])
        del self._buffer[:length]
        return body

    @property
    def trailing(self) -> bytes:
        """Bytes received after the packets taken so far (must be empty before TLS)."""
        return bytes(self._buffer)


class MessageReader:
    """Incremental reader of typed messages.

    :meth:`feed` appends bytes; :meth:`next_message` returns ``(type, payload)``
    for each complete message, or None when more bytes are needed.
    :meth:`drain` returns every complete message at once, which is what the
    forwarding loops use.
    """

    __slots__ = ("_buffer", "_max_size", "_offset")

    def __init__(self, max_size: int = DEFAULT_MAX_MESSAGE) -> None:
        self._buffer = bytearray()
        self._offset = 0
        self._max_size = max_size

    def feed(self, data: bytes) -> None:
        if self._offset:
            del self._buffer[: self._offset]
            self._offset = 0
        self._buffer += data

    def next_message(self) -> tuple[int, bytes] | None:
        buffer = self._buffer
        offset = self._offset
        if len(buffer) - offset < 5:
            return None
        msg_type, length = _HEADER.unpack_from(buffer, offset)
        if length < 4 or length - 4 > self._max_size:
            raise invalid_length(msg_type[0], length, self._max_size)
        end = offset + 1 + length
        if len(buffer) < end:
            return None
        payload = bytes(buffer[offset + 5 : end])
        self._offset = end
        return msg_type[0], payload

    def drain(self) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        while (message := self.next_message()) is not None:
            out.append(message)
        return out

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as messages."""
        return len(self._buffer) - self._offset


def invalid_length(msg_type: int, length: int, max_size: int) -> RemoteProtocolError:
    """The error for a typed message whose length word is below 4 or above the cap."""
    return RemoteProtocolError(
        f"message {bytes((msg_type,))!r} has invalid length {length} (limit {max_size + 4})"
    )


def frame(msg_type: bytes, payload: bytes = b"") -> bytes:
    """Encode one typed message."""
    return msg_type + _INT32.pack(len(payload) + 4) + payload


def frame_first_packet(body: bytes) -> bytes:
    """Encode an untyped first packet."""
    return _INT32.pack(len(body) + 4) + body


def scan_frames(
    buffer: bytes | bytearray, max_size: int = DEFAULT_MAX_MESSAGE
) -> tuple[list[tuple[int, int, int]], int]:
    """Locate the complete typed messages in ``buffer`` without copying them.

    Returns ``([(type, payload_start, end), ...], consumed)``: the forwarding
    loop slices only the payloads it must read and forwards runs of untouched
    frames as one slice.  Same length checks as :class:`MessageReader`.
    """
    frames: list[tuple[int, int, int]] = []
    pos = 0
    size = len(buffer)
    unpack = _HEADER.unpack_from
    while size - pos >= 5:
        msg_type, length = unpack(buffer, pos)
        if length < 4 or length - 4 > max_size:
            raise invalid_length(msg_type[0], length, max_size)
        end = pos + 1 + length
        if end > size:
            break
        frames.append((msg_type[0], pos + 5, end))
        pos = end
    return frames, pos
