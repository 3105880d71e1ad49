"""framing: FirstPacketReader, MessageReader, frame() — whole, byte-at-a-time, trailing data."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tenantgate.errors import RemoteProtocolError
from tenantgate.protocol.framing import (
    DEFAULT_MAX_MESSAGE,
    MAX_STARTUP_PACKET,
    FirstPacketReader,
    HeldBytes,
    MessageReader,
    frame,
    frame_first_packet,
    scan_frames,
    uint32_at,
)

SSL_BODY = struct.pack("!I", 80877103)
STARTUP_BODY = struct.pack("!I", 196608) + b"user\x00alice\x00database\x00app\x00\x00"
NEXT_MESSAGE = frame(b"Q", b"SELECT 1\x00")


def first_packets(data: bytes, chunks: list[bytes]) -> tuple[list[bytes], bytes]:
    """Feed ``chunks`` to a FirstPacketReader; every complete packet and the trailing bytes."""
    assert b"".join(chunks) == data
    reader = FirstPacketReader()
    out: list[bytes] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (packet := reader.next_packet()) is not None:
            out.append(packet)
    return out, reader.trailing


def messages(
    chunks: list[bytes], max_size: int = DEFAULT_MAX_MESSAGE
) -> tuple[list[tuple[int, bytes]], int]:
    """Feed ``chunks`` to a MessageReader taking messages after each; messages and leftovers."""
    reader = MessageReader(max_size)
    out: list[tuple[int, bytes]] = []
    for chunk in chunks:
        reader.feed(chunk)
        out.extend(reader.drain())
    return out, reader.buffered


def whole(data: bytes) -> list[bytes]:
    return [data]


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def halves(data: bytes) -> list[bytes]:
    mid = len(data) // 2
    return [data[:mid], data[mid:]]


SPLITTERS: list[Callable[[bytes], list[bytes]]] = [whole, bytewise, halves]


# --- frame / frame_first_packet ---------------------------------------------------------


def test_frame_layout() -> None:
    assert frame(b"Q", b"x\x00") == b"Q\x00\x00\x00\x06x\x00"
    assert frame(b"S") == b"S\x00\x00\x00\x04"


def test_frame_first_packet_layout() -> None:
    assert frame_first_packet(SSL_BODY) == b"\x00\x00\x00\x08" + SSL_BODY


# --- FirstPacketReader ------------------------------------------------------------------


@pytest.mark.parametrize("split", SPLITTERS)
@pytest.mark.parametrize("body", [SSL_BODY, STARTUP_BODY])
def test_first_packet_reader_splits(split: Callable[[bytes], list[bytes]], body: bytes) -> None:
    data = frame_first_packet(body)
    assert first_packets(data, split(data)) == ([body], b"")


@pytest.mark.parametrize("split", SPLITTERS)
def test_first_packet_reader_keeps_trailing_data(split: Callable[[bytes], list[bytes]]) -> None:
    # An SSLRequest followed by bytes the client sent before the TLS handshake: the reader
    # returns the packet and exposes the rest (the caller must refuse it).
    data = frame_first_packet(SSL_BODY) + NEXT_MESSAGE
    reader = FirstPacketReader()
    packets: list[bytes] = []
    for chunk in split(data):
        reader.feed(chunk)
        if not packets and (packet := reader.next_packet()) is not None:
            packets.append(packet)
    assert packets == [SSL_BODY]
    assert reader.trailing == NEXT_MESSAGE


def test_first_packet_reader_two_packets_in_one_feed() -> None:
    data = frame_first_packet(SSL_BODY) + frame_first_packet(STARTUP_BODY)
    assert first_packets(data, [data]) == ([SSL_BODY, STARTUP_BODY], b"")


@pytest.mark.parametrize("prefix", [b"", b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x08\x04\xd2"])
def test_first_packet_reader_incomplete_returns_none(prefix: bytes) -> None:
    reader = FirstPacketReader()
    reader.feed(prefix)
    assert reader.next_packet() is None
    assert reader.trailing == prefix


@pytest.mark.parametrize("length", [0, 4, 7, MAX_STARTUP_PACKET + 1, 0x7FFFFFFF, 0xFFFFFFFF])
def test_first_packet_reader_rejects_bad_length_from_header_alone(length: int) -> None:
    reader = FirstPacketReader()
    reader.feed(struct.pack("!I", length))
    with pytest.raises(RemoteProtocolError, match="invalid startup packet length"):
        reader.next_packet()


def test_first_packet_reader_accepts_exactly_max_startup_packet() -> None:
    assert MAX_STARTUP_PACKET == 10000
    body = b"\x00" * (MAX_STARTUP_PACKET - 4)
    data = frame_first_packet(body)
    assert len(data) == MAX_STARTUP_PACKET
    assert first_packets(data, [data]) == ([body], b"")


def test_first_packet_reader_custom_max_size() -> None:
    reader = FirstPacketReader(max_size=100)
    reader.feed(struct.pack("!I", 101))
    with pytest.raises(RemoteProtocolError):
        reader.next_packet()


# --- MessageReader ----------------------------------------------------------------------

CONVERSATION = [
    (ord("P"), b"s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17"),
    (ord("B"), b"\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x01" + b"7" + b"\x00\x00"),
    (ord("E"), b"\x00\x00\x00\x00\x00"),
    (ord("S"), b""),
    (ord("d"), bytes(range(256)) * 4),
    (ord("Q"), b"SELECT 1\x00"),
]
CONVERSATION_BYTES = b"".join(frame(bytes((t,)), p) for t, p in CONVERSATION)


@pytest.mark.parametrize("split", SPLITTERS)
def test_message_reader_splits(split: Callable[[bytes], list[bytes]]) -> None:
    assert messages(split(CONVERSATION_BYTES)) == (CONVERSATION, 0)


@pytest.mark.parametrize("split", SPLITTERS)
def test_message_reader_with_trailing_partial_message(
    split: Callable[[bytes], list[bytes]],
) -> None:
    partial = NEXT_MESSAGE[:-3]
    got, leftover = messages(split(CONVERSATION_BYTES + partial))
    assert got == CONVERSATION
    assert leftover == len(partial)


def test_message_reader_next_message_is_incremental() -> None:
    reader = MessageReader()
    data = frame(b"Q", b"SELECT 1\x00")
    for byte in data[:-1]:
        reader.feed(bytes([byte]))
        assert reader.next_message() is None
    reader.feed(data[-1:])
    assert reader.next_message() == (ord("Q"), b"SELECT 1\x00")
    assert reader.next_message() is None
    assert reader.buffered == 0


def test_message_reader_interleaved_feed_and_take_compacts() -> None:
    # Feed after a partial take must not lose or repeat bytes.
    reader = MessageReader()
    reader.feed(frame(b"S") + frame(b"H")[:2])
    assert reader.next_message() == (ord("S"), b"")
    assert reader.buffered == 2
    reader.feed(frame(b"H")[2:] + frame(b"X"))
    assert reader.drain() == [(ord("H"), b""), (ord("X"), b"")]
    assert reader.buffered == 0


def test_message_reader_empty_payload_message() -> None:
    assert messages([frame(b"c")]) == ([(ord("c"), b"")], 0)


@pytest.mark.parametrize("length", [0x80000000, 0xFFFFFFFF, DEFAULT_MAX_MESSAGE + 5])
def test_message_reader_huge_length_fails_on_header(length: int) -> None:
    reader = MessageReader()
    reader.feed(b"Q" + struct.pack("!I", length))
    with pytest.raises(RemoteProtocolError, match="invalid length"):
        reader.next_message()
    assert reader.buffered == 5  # nothing beyond the header was needed or kept


def test_message_reader_2gib_header_after_valid_messages() -> None:
    reader = MessageReader()
    reader.feed(frame(b"S") + b"d" + struct.pack("!I", 2**31))
    assert reader.next_message() == (ord("S"), b"")
    with pytest.raises(RemoteProtocolError):
        reader.next_message()


@pytest.mark.parametrize("length", [0, 1, 3])
def test_message_reader_length_below_four(length: int) -> None:
    reader = MessageReader()
    reader.feed(b"S" + struct.pack("!I", length))
    with pytest.raises(RemoteProtocolError):
        reader.next_message()


def test_message_reader_cap_boundary() -> None:
    cap = 1024
    ok = frame(b"d", b"x" * cap)
    assert messages([ok], max_size=cap) == ([(ord("d"), b"x" * cap)], 0)
    reader = MessageReader(cap)
    reader.feed(frame(b"d", b"x" * (cap + 1))[:5])
    with pytest.raises(RemoteProtocolError, match="limit 1028"):
        reader.next_message()


# --- scan_frames and HeldBytes: how the session's pumps frame a stream ------------------


def pump(chunks: list[bytes], max_size: int = DEFAULT_MAX_MESSAGE) -> tuple[list[bytes], int, int]:
    """Frame ``chunks`` as Session's pumps do: scan a chunk as it is when nothing is held,
    else hold it until the head frame is complete.  The frames found (whole), the bytes
    left held, and how many times a scan ran."""
    held = HeldBytes()
    found: list[bytes] = []
    scans = 0
    for chunk in chunks:
        if len(held):
            joined = held.join(chunk)
            if joined is None:
                continue
            buffer = joined
        else:
            buffer = chunk
        scans += 1
        frames, consumed = scan_frames(buffer, max_size)
        found.extend(buffer[start - 5 : end] for _, start, end in frames)
        if consumed < len(buffer):
            held.keep(buffer, consumed)
    return found, len(held), scans


STREAM = [frame(b"Q", b"SELECT 1\x00"), frame(b"S"), frame(b"D", b"x" * 300), frame(b"H")]


@pytest.mark.parametrize("split", SPLITTERS)
def test_pump_finds_every_frame(split: Callable[[bytes], list[bytes]]) -> None:
    data = b"".join(STREAM)
    found, left, _ = pump(split(data))
    assert found == STREAM
    assert left == 0


@pytest.mark.parametrize("split", SPLITTERS)
def test_pump_holds_trailing_partial_frame(split: Callable[[bytes], list[bytes]]) -> None:
    data = b"".join(STREAM) + NEXT_MESSAGE[:7]
    found, left, _ = pump(split(data))
    assert found == STREAM
    assert left == 7


def test_large_frame_is_scanned_once_complete() -> None:
    big = frame(b"D", bytes(range(256)) * 4096)  # 1 MiB, in 1,000 chunks after its header
    chunks = [big[:10]] + [big[i : i + 1049] for i in range(10, len(big), 1049)]
    found, left, scans = pump(chunks)
    assert found == [big]
    assert left == 0
    assert scans == 2  # the header's chunk, then the chunk that completes the frame


def test_scan_frames_rejects_bad_length_from_header_alone() -> None:
    with pytest.raises(RemoteProtocolError, match="invalid length"):
        scan_frames(b"D" + struct.pack("!I", 2**31), 1024)
    with pytest.raises(RemoteProtocolError, match="invalid length"):
        scan_frames(NEXT_MESSAGE + b"D\x00\x00\x00\x03", 1024)


def test_held_bytes_keep_needs_an_empty_holder() -> None:
    held = HeldBytes()
    held.keep(NEXT_MESSAGE, len(NEXT_MESSAGE) - 3)  # less than a header: wait for 5 bytes
    assert len(held) == 3
    assert held.join(NEXT_MESSAGE[:1]) is None
    with pytest.raises(AssertionError):
        held.keep(NEXT_MESSAGE, 0)
    assert held.join(NEXT_MESSAGE[1:2]) == NEXT_MESSAGE[-3:] + NEXT_MESSAGE[:2]
    assert len(held) == 0
    held.add(NEXT_MESSAGE)  # the rate limit's deferral: held as is, taken whole
    assert held.take() == NEXT_MESSAGE
    assert len(held) == 0


@given(st.lists(st.binary(max_size=40), max_size=12), st.lists(st.integers(1, 64), max_size=40))
def test_pump_agrees_with_message_reader(payloads: list[bytes], cuts: list[int]) -> None:
    data = b"".join(frame(b"d", p) for p in payloads)
    chunks, pos = [], 0
    for cut in cuts:
        chunks.append(data[pos : pos + cut])
        pos += cut
    chunks.append(data[pos:])
    found, left, _ = pump([c for c in chunks if c])
    reference, buffered = messages(chunks)
    assert [(f[0], f[5:]) for f in found] == reference
    assert left == buffered == 0


@given(st.binary(min_size=4, max_size=12), st.integers(0, 8))
def test_uint32_at_is_struct(data: bytes, pos: int) -> None:
    if pos + 4 <= len(data):
        assert uint32_at(data, pos) == struct.unpack_from("!I", data, pos)[0]
    else:
        with pytest.raises(IndexError):
            uint32_at(data, pos)
