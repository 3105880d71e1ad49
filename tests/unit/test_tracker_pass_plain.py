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
from collections.abc import Callable
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
    # [Parse +] Bind [+ Describe portal] + Execute + Sync as the session's fast path
    # sends it: one entry for all (expect_bound) or, for the reference, one per part.
    bound: bool = False
    describe: bool = False
    parse: bool = False


@dataclass
class Recorder:
    events: list[tuple[str, int, bool]] = field(default_factory=list)
    described: list[tuple[int, bytes]] = field(default_factory=list)

    def build(
        self, requests: list[Request], compact: bool = False
    ) -> tuple[ResponseTracker, list[Pending]]:
        tracker = ResponseTracker()
        tracker.on_complete = lambda entry, ok: self.events.append(("complete", id_of(entry), ok))
        entries = []
        for index, request in enumerate(requests):
            if request.bound:
                parse_done = self._done(index) if request.parse else None
                entries.append(expect_bound(tracker, index, request.describe, parse_done, compact))
                continue
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


def expect_bound(
    tracker: ResponseTracker,
    index: int,
    describe: bool,
    parse_done: Callable[[bool], None] | None,
    compact: bool,
) -> Pending:
    """Register a bound request as the session does: its EXECUTE entry stands for
    all its parts (``compact``), or each part gets its own entry."""
    entry = Pending(Kind.EXECUTE, command=str(index))
    if compact:
        tracker.expect_bound(entry, describe, parse_done)
        return entry
    parts = [] if parse_done is None else [Pending(Kind.PARSE, on_done=parse_done)]
    parts.append(Pending(Kind.BIND))
    if describe:
        parts.append(Pending(Kind.DESCRIBE_PORTAL))
    for part in (*parts, entry, Pending(Kind.SYNC)):
        tracker.expect(part)
    return entry


def id_of(entry: Pending) -> int:
    return int(entry.command)


def answer(request: Request, rows: int, status: str) -> list[bytes]:
    """The normal answer of one request."""
    if request.bound:
        described = [ROWDESC if rows % 2 else empty("n")] if request.describe else []
        parsed = [empty("1")] if request.parse else []
        return [
            *parsed,
            empty("2"),
            *described,
            *[ROW] * rows,
            complete(f"SELECT {rows}"),
            ready(status),
        ]
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


bound_requests = st.builds(
    Request,
    kind=st.just(Kind.EXECUTE),
    bound=st.just(True),
    describe=st.booleans(),
    parse=st.booleans(),
)
mixed_requests_strategy = st.lists(
    st.one_of(bound_requests, bound_requests, requests_strategy.map(lambda r: r[0])),
    min_size=1,
    max_size=6,
)


@st.composite
def scenario(
    draw: st.DrawFn, requests_of: st.SearchStrategy[list[Request]] = requests_strategy
) -> tuple[list[Request], list[bytes], list[int]]:
    requests = draw(requests_of)
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


def assert_routed_alike(
    case: tuple[list[Request], list[bytes], list[int]], compact: bool = False
) -> tuple[Recorder, Recorder, ResponseTracker, ResponseTracker]:
    """Route ``case`` one message at a time (the reference) and as the session does
    (pass_plain, route() at each stop; bound requests as one entry if ``compact``):
    the same failure, callbacks, state and verdicts.  Returns the recorders and
    trackers (reference first)."""
    requests, messages, cuts = case
    one, batch = Recorder(), Recorder()
    reference, reference_entries = one.build(requests)
    tracker, entries = batch.build(requests, compact=compact)
    assert tracker.outstanding == reference.outstanding

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
    return one, batch, reference, tracker


@settings(max_examples=400, deadline=None)
@given(scenario())
def test_pass_plain_matches_route(case: tuple[list[Request], list[bytes], list[int]]) -> None:
    assert_routed_alike(case)


@settings(max_examples=400, deadline=None)
@given(scenario(mixed_requests_strategy))
def test_a_bound_request_is_routed_as_its_parts(
    case: tuple[list[Request], list[bytes], list[int]],
) -> None:
    """One entry for [Parse +] Bind [+ Describe] + Execute + Sync (expect_bound),
    driven as the session drives it, does exactly what the separate entries do
    routed one by one: same callbacks, state, outstanding count and verdicts, on
    normal answers and on errors, notices, suspended portals and junk mixed in."""
    one, batch, reference, tracker = assert_routed_alike(case, compact=True)
    one.events.clear()
    batch.events.clear()
    reference.fail_all()
    tracker.fail_all()  # the upstream is gone: each statement still outstanding fails once
    assert batch.events == one.events
    assert tracker.idle


def test_a_bound_request_expected_while_skipping_keeps_only_its_sync() -> None:
    """An error emptied the queue before the client's Sync: the server now skips to
    the next Sync, so a bound request's Bind and Execute are skipped at once."""
    events: list[tuple[int, bool]] = []
    tracker = ResponseTracker()
    tracker.on_complete = lambda entry, ok: events.append((id_of(entry), ok))
    tracker.expect(Pending(Kind.PARSE))
    assert tracker.route(ERROR[0], ERROR[5:]) == (Action.FORWARD, None)
    assert tracker.idle  # and skipping until a Sync
    entry = Pending(Kind.EXECUTE, command="7")
    tracker.expect_bound(entry, describe=True)
    assert entry.skipped
    assert entry.failed
    assert events == [(7, False)]
    assert tracker.outstanding == 1  # the Sync
    assert tracker.pass_plain(ready("I"), 0) == len(ready("I"))
    assert tracker.idle


def test_a_bound_request_behind_a_failing_parse_is_skipped_up_to_its_sync() -> None:
    events: list[tuple[int, bool]] = []
    tracker = ResponseTracker()
    tracker.on_complete = lambda entry, ok: events.append((id_of(entry), ok))
    tracker.expect(Pending(Kind.PARSE))
    entry = Pending(Kind.EXECUTE, command="3")
    tracker.expect_bound(entry, describe=False)
    assert tracker.outstanding == 4
    assert tracker.pass_plain(ERROR, 0) == 0  # an error is routed one by one
    assert tracker.route(ERROR[0], ERROR[5:]) == (Action.FORWARD, None)
    assert entry.skipped
    assert events == [(3, False)]
    assert tracker.outstanding == 1
    assert tracker.route(ord("Z"), b"I") == (Action.FORWARD, None)
    assert tracker.idle


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
