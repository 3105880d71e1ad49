"""tracker.pass_plain: the batch path must do exactly what route() does, message by message.

Property: for any outstanding requests and any stream of backend messages
(mostly the normal answers, with notices, errors, dropped and foreign
messages mixed in), cut into arbitrary chunks, a tracker driven the way the
session drives it (pass_plain over each chunk, route() for whatever it stops
at) ends in the same state, fires the same callbacks in the same order, and
forwards/drops/replaces the same messages as a tracker that routes every
message one by one; and both reject an invalid stream at the same message.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from tenantgate.errors import RemoteProtocolError, rejected
from tenantgate.protocol.backend import (
    CommandComplete,
    DataRow,
    Empty,
    ErrorResponse,
    FieldDescription,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    ReadyForQuery,
    RowDescription,
)
from tenantgate.tracker import Action, Kind, Pending, ResponseTracker

ROWDESC = RowDescription((FieldDescription("x", 0, 0, 23, 4, -1, 0),)).encode()
ROW = DataRow((b"1",)).encode()
NOTICE = ErrorResponse((("S", "NOTICE"), ("C", "00000"), ("M", "hi")), notice=True).encode()
STATUS = ParameterStatus("TimeZone", "UTC").encode()
NOTIFY = NotificationResponse(1, "chan", "x").encode()
ERROR = ErrorResponse((("S", "ERROR"), ("V", "ERROR"), ("C", "22012"), ("M", "boom"))).encode()
SYNTAX = ErrorResponse((("S", "ERROR"), ("V", "ERROR"), ("C", "42601"), ("M", "x"))).encode()
PARAMS = ParameterDescription((23,)).encode()


def empty(kind: str) -> bytes:
    return Empty(kind).encode()


def complete(tag: str) -> bytes:
    return CommandComplete(tag).encode()


def ready(status: str) -> bytes:
    return ReadyForQuery(status).encode()


@dataclass
class Request:
    kind: Kind
    injected: bool = False
    rejected: bool = False
    hidden: frozenset[int] = frozenset()
    shifts: tuple[tuple[int, int], ...] = ()
    describe_callback: bool = False


@dataclass
class Recorder:
    events: list[tuple[str, int, bool]] = field(default_factory=list)
    described: list[tuple[int, bytes]] = field(default_factory=list)

    def build(self, requests: list[Request]) -> tuple[ResponseTracker, list[Pending]]:
        tracker = ResponseTracker()
        tracker.on_complete = lambda entry, ok: self.events.append(("complete", id_of(entry), ok))
        entries = []
        for index, request in enumerate(requests):
            entry = Pending(
                request.kind,
                injected=request.injected,
                rejection=rejected("rule", "no", "hint") if request.rejected else None,
                hidden_statements=request.hidden,
                on_done=self._done(index),
                position_shifts=request.shifts,
            )
            entry.command = str(index)  # identifies the entry in the events
            if request.describe_callback:
                entry.on_parameter_description = self._described(index)
            entries.append(entry)
            tracker.expect(entry)
        return tracker, entries

    def _done(self, index: int):  # type: ignore[no-untyped-def]
        return lambda ok: self.events.append(("done", index, ok))

    def _described(self, index: int):  # type: ignore[no-untyped-def]
        return lambda payload: self.described.append((index, payload))


def id_of(entry: Pending) -> int:
    return int(entry.command)


def answer(request: Request, rows: int, status: str) -> list[bytes]:
    """The normal answer of one request."""
    match request.kind:
        case Kind.QUERY:
            return [ROWDESC, *[ROW] * rows, complete(f"SELECT {rows}"), ready(status)]
        case Kind.EXECUTE:
            return [*[ROW] * rows, complete(f"UPDATE {rows}")]
        case Kind.PARSE:
            return [empty("1")]
        case Kind.BIND:
            return [empty("2")]
        case Kind.CLOSE:
            return [empty("3")]
        case Kind.DESCRIBE_PORTAL:
            return [ROWDESC if rows % 2 else empty("n")]
        case Kind.DESCRIBE_STATEMENT:
            return [PARAMS, ROWDESC if rows % 2 else empty("n")]
        case Kind.SYNC:
            return [ready(status)]
    raise AssertionError(request.kind)


requests_strategy = st.lists(
    st.builds(
        Request,
        kind=st.sampled_from(list(Kind)),
        injected=st.booleans() | st.just(False),
        rejected=st.sampled_from([False, False, False, True]),
        hidden=st.sampled_from([frozenset(), frozenset(), frozenset({0}), frozenset({1})]),
        shifts=st.sampled_from([(), (), ((0, 5),)]),
        describe_callback=st.booleans(),
    ),
    min_size=1,
    max_size=6,
)
EXTRAS = [NOTICE, STATUS, NOTIFY, ERROR, SYNTAX, empty("I"), empty("s"), ROW, ROWDESC, b"Zjunk"]


@st.composite
def scenario(draw: st.DrawFn) -> tuple[list[Request], list[bytes], list[int]]:
    requests = draw(requests_strategy)
    messages: list[bytes] = []
    for request in requests:
        rows = draw(st.integers(0, 3))
        status = draw(st.sampled_from("ITE"))
        messages += answer(request, rows, status)
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["insert", "replace", "delete"]))
        index = draw(st.integers(0, len(messages)))
        extra = draw(st.sampled_from(EXTRAS))
        if extra == b"Zjunk":
            extra = b"Z" + struct.pack("!I", 5) + b"X"  # invalid status
        if action == "insert":
            messages.insert(index, extra)
        elif messages and index < len(messages):
            if action == "replace":
                messages[index] = extra
            else:
                del messages[index]
    stream_length = sum(len(m) for m in messages)
    cuts = sorted(draw(st.lists(st.integers(0, stream_length), max_size=5)))
    return requests, messages, cuts


Verdict = tuple[Action, bytes | None]


def route_each(tracker: ResponseTracker, messages: list[bytes]) -> tuple[list[Verdict], bool]:
    verdicts: list[Verdict] = []
    for message in messages:
        try:
            verdicts.append(tracker.route(message[0], message[5:]))
        except RemoteProtocolError:
            return verdicts, True
    return verdicts, False


def drive_like_the_session(
    tracker: ResponseTracker, stream: bytes, cuts: list[int]
) -> tuple[list[tuple[int, Verdict]], bool]:
    """Feed ``stream`` in chunks; pass_plain first, route() at each stop (as Session does).

    Returns the (offset, verdict) of every message routed one by one; the
    offsets pass_plain consumed are implicitly forwarded.
    """
    routed: list[tuple[int, Verdict]] = []
    buffer = bytearray()
    base = 0  # stream offset of buffer[0]
    edges = [*cuts, len(stream)]
    previous = 0
    for edge in edges:
        buffer += stream[previous:edge]
        previous = edge
        data = bytes(buffer)  # the session scans bytes (see framing.HeldBytes)
        pos = tracker.pass_plain(data, 0)
        while len(data) - pos >= 5:
            (length,) = struct.unpack_from("!I", data, pos + 1)
            end = pos + 1 + length
            if end > len(data):
                break
            try:
                verdict = tracker.route(data[pos], data[pos + 5 : end])
            except RemoteProtocolError:
                return routed, True
            routed.append((base + pos, verdict))
            pos = tracker.pass_plain(data, end)
        del buffer[:pos]
        base += pos
    return routed, False


def state(tracker: ResponseTracker, entries: list[Pending]) -> list[object]:
    return [
        tracker.status,
        tracker.outstanding,
        [(e.rows, e.statement_index, e.failed, e.skipped) for e in entries],
    ]


@settings(max_examples=400, deadline=None)
@given(scenario())
def test_pass_plain_matches_route(case: tuple[list[Request], list[bytes], list[int]]) -> None:
    requests, messages, cuts = case
    one, batch = Recorder(), Recorder()
    reference, reference_entries = one.build(requests)
    tracker, entries = batch.build(requests)

    verdicts, reference_failed = route_each(reference, messages)
    routed, failed = drive_like_the_session(tracker, b"".join(messages), cuts)

    assert failed == reference_failed
    assert batch.events == one.events
    assert batch.described == one.described
    assert state(tracker, entries) == state(reference, reference_entries)
    offsets = [0]
    for message in messages:
        offsets.append(offsets[-1] + len(message))
    routed_at = dict(routed)
    for index, verdict in enumerate(verdicts):
        at = offsets[index]
        if at in routed_at:
            assert routed_at[at] == verdict
        else:  # consumed by pass_plain: only what route() forwards unchanged
            assert verdict == (Action.FORWARD, None)


def test_pass_plain_stops_at_incomplete_and_foreign_frames() -> None:
    tracker = ResponseTracker()
    tracker.expect(Pending(Kind.QUERY))
    whole = ROWDESC + ROW + complete("SELECT 1") + ready("T")
    assert tracker.pass_plain(whole[:-1], 0) == len(whole) - 6  # ReadyForQuery incomplete
    assert not tracker.idle
    assert tracker.pass_plain(whole, len(whole) - 6) == len(whole)
    assert tracker.idle
    assert tracker.status == "T"
    tracker.expect(Pending(Kind.QUERY))
    assert tracker.pass_plain(NOTICE + ready("I"), 0) == 0  # a notice is routed one by one
    assert tracker.pass_plain(b"", 0) == 0
