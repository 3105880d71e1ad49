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
from typing import Final

from tenantgate.errors import RemoteProtocolError

MAX_STARTUP_PACKET: Final = 10000
DEFAULT_MAX_MESSAGE: Final = 64 * 1024 * 1024
_HEADER: Final = struct.Struct("!cI")
_INT32: Final = struct.Struct("!I")


def uint32_at(data: bytes, pos: int) -> int:
    """The big-endian UInt32 at ``pos`` (IndexError when short).

    Indexing ``bytes`` compiles to plain C; ``struct`` would be a call into an
    interpreted-level API with a tuple and a boxed int per message.
    """
    return (data[pos] << 24) | (data[pos + 1] << 16) | (data[pos + 2] << 8) | data[pos + 3]


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
    buffer: bytes, max_size: int = DEFAULT_MAX_MESSAGE
) -> tuple[list[tuple[int, int, int]], int]:
    """Locate the complete typed messages in ``buffer`` without copying them.

    Returns ``([(type, payload_start, end), ...], consumed)``: the forwarding
    loop slices only the payloads it must read and forwards runs of untouched
    frames as one slice.  Same length checks as :class:`MessageReader`.
    """
    frames: list[tuple[int, int, int]] = []
    pos = 0
    size = len(buffer)
    while size - pos >= 5:
        msg_type = buffer[pos]
        length = uint32_at(buffer, pos + 1)
        if length < 4 or length - 4 > max_size:
            raise invalid_length(msg_type, length, max_size)
        end = pos + 1 + length
        if end > size:
            break
        frames.append((msg_type, pos + 5, end))
        pos = end
    return frames, pos


class HeldBytes:
    """The unconsumed tail of a message stream, until there is a frame's worth.

    The forwarding loops scan ``bytes`` (indexing them compiles to plain C;
    a ``bytearray`` or a union of both does not).  A chunk received with
    nothing held is scanned as it is; what a scan leaves (an incomplete frame,
    or frames deferred by the rate limit) is kept here with the size the head
    frame needs; later chunks are only appended until that size is reached,
    and :meth:`join` then returns the held bytes and the last chunk as one
    ``bytes``.  Each byte is copied at most once into the holder and once out,
    however many chunks a large message spans.
    """

    __slots__ = ("_held", "_wanted")

    def __init__(self) -> None:
        self._held = bytearray()
        self._wanted = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, data: bytes) -> None:
        """Hold ``data`` after what is held (frames the rate limit deferred: see take)."""
        self._held += data

    def join(self, data: bytes) -> bytes | None:
        """What is held followed by ``data``, as one ``bytes`` (the holder is then
        empty), once the head frame is complete; until then None (``data`` is held)."""
        held = self._held
        if len(held) + len(data) < self._wanted:
            held += data
            return None
        buffer = b"".join((held, data))  # one copy of each part
        held.clear()
        self._wanted = 0
        return buffer

    def take(self) -> bytes:
        """Everything held, as one ``bytes``; the holder is then empty."""
        buffer = bytes(self._held)
        self._held.clear()
        self._wanted = 0
        return buffer

    def keep(self, buffer: bytes, pos: int) -> None:
        """Hold ``buffer[pos:]``, whose head frame's length word (if there) was checked.

        The holder must be empty: the caller scanned what it took (or a chunk
        received while nothing was held).
        """
        assert not self._held, "keep() after take(): the held bytes were scanned"
        self._held += memoryview(buffer)[pos:]
        self._wanted = 1 + uint32_at(buffer, pos + 1) if len(buffer) - pos >= 5 else 5
