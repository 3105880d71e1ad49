"""The steady-state lane (``_lane.c``) decides exactly as the Python path it stands in for.

The lane takes a client chunk only when ``Session._bound_execute`` would take
it and ``PolicyInspector.known_bind`` would allow it by its ``_BindLane``
(``bind_params_at`` + ``_all_text``); it takes a server chunk only when
``ResponseTracker.pass_plain`` would consume all of it for the lane's request
and leave the tracker idle outside a transaction block, with the same row
count.  Otherwise it hands its request over as the entry the Python path makes.
Each property below holds the C code to that Python reference over generated
and damaged inputs; the session-level comparison of the whole path is
``test_session_fast_paths.py``.
"""

from __future__ import annotations

import array
import asyncio
import bisect
import gc
import itertools
import re
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantgate import session as session_module
from tenantgate.analysis.textshapes import (
    LANE_DIGIT,
    LANE_INT4,
    LANE_NUMERIC,
    LANE_TENANT,
    _kind,
    digits_of,
)
from tenantgate.compiled import lane_class
from tenantgate.enforcement import PolicyInspector, _all_text
from tenantgate.errors import TenantgateError
from tenantgate.hooks import PortalInfo
from tenantgate.protocol.backend import (
    CommandComplete,
    DataRow,
    Empty,
    ErrorResponse,
    FieldDescription,
    ReadyForQuery,
    RowDescription,
)
from tenantgate.protocol.framing import scan_frames, uint32_at
from tenantgate.protocol.frontend import Bind, Close, Execute, Parse, Query, Sync, bind_params_at
from tenantgate.session import _DESCRIBE_EXECUTE_SYNC, _EXECUTE_SYNC
from tenantgate.tracker import Action, Kind, Pending, ResponseTracker

if TYPE_CHECKING:
    from tenantgate._lane import Lane

try:
    import tenantgate._lane as lane_module
except ImportError:  # a pure-Python install: every test here is skipped
    lane_module = None  # type: ignore[assignment]

LANE = lane_class()
pytestmark = pytest.mark.skipif(LANE is None, reason="the lane runs on the compiled build only")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_session_fast_paths import (  # noqa: E402
    POLICY,
    PREPARED,
    SWAPPED,
    TURN,
    _bound,
    _control_bound,
    _proxy,
    _row_description,
    _run,
    _Server,
)

TENANT = b"acme"
INFO = PortalInfo(False, "select", "SELECT 1")
MAX_MESSAGE = 1 << 16


class _Ends:
    """What a lane wrote to either side and handed over."""

    def __init__(self) -> None:
        self.upstream: list[bytes] = []
        self.client: list[bytes] = []
        self.handed: list[tuple[object, bool, float]] = []
        self.parses: list[bytes | None] = []  # the Parse payload handed over with each
        self.queries: list[tuple[str, str, float]] = []  # the Queries handed over
        self.spliced: list[bool] = []  # whether each was sent with the splice
        self.marks = 0

    def hand_query(self, sql: str, command: str, started: float, spliced: bool) -> None:
        self.queries.append((sql, command, started))
        self.spliced.append(spliced)

    def hand(self, info: object, describe: bool, started: float, parse: bytes | None) -> None:
        self.handed.append((info, describe, started))
        self.parses.append(parse)

    def mark(self) -> None:
        self.marks += 1


def _lane(
    bounds: tuple[float, ...] = (),
    max_message: int = MAX_MESSAGE,
    known_queries: bool = True,
    tenant: bytes = TENANT,
    splice: bytes | None = None,
) -> tuple[Lane, _Ends, dict[str, Any]]:
    """A lane as an enforce-mode session makes it (rls/both: not ``known_queries``,
    and the injector's prefix to ``splice``)."""
    assert LANE is not None
    ends = _Ends()
    lane = LANE(
        ends.upstream.append,
        ends.client.append,
        ends.hand,
        tenant,
        max_message,
        ends.hand_query,
        known_queries=known_queries,
        splice=splice,
    )
    portals: dict[str, Any] = {}
    lane.attach(portals, 1000)
    lane.report_to(ends.mark, bounds)
    return lane, ends, portals


def _chunk(bind: bytes, describe: bool) -> bytes:
    return bind + (_DESCRIBE_EXECUTE_SYNC if describe else _EXECUTE_SYNC)


# --- the client side: the Bind check ---------------------------------------------------


def _python_takes(
    chunk: bytes, name: bytes, numbers: tuple[int, ...], parse: bytes | None = None
) -> bool:
    """What _bound_execute + known_bind's _BindLane branch decide for ``chunk`` (with
    ``parse``: the unnamed statement's Parse payload known_parse answers for, and
    known_bind of the unnamed statement, whose tenant parameters are of a text type)."""
    parse_end = 0
    if parse is not None:
        if chunk[:1] != b"P" or len(chunk) < 5:
            return False  # the lane was taught no named statement here
        length = uint32_at(chunk, 1)
        parse_end = 1 + length
        if length < 4 or length - 4 > MAX_MESSAGE or len(chunk) < parse_end + 5:
            return False
        if chunk[5:parse_end] != parse:
            return False  # not the known Parse: decoded and inspected
        name = b""
    chunk = chunk[parse_end:]
    if len(chunk) < 5 or chunk[0] != 0x42:
        return False
    length = uint32_at(chunk, 1)
    end = 1 + length
    if length < 4 or length - 4 > MAX_MESSAGE:
        return False
    if chunk[end:] not in (_EXECUTE_SYNC, _DESCRIBE_EXECUTE_SYNC):
        return False
    if length == 4 or chunk[5] != 0:
        return False
    payload = chunk[5:end]
    name_end = payload.find(0, 1)
    if name_end < 0 or payload[1:name_end] != name:
        return False
    values = bind_params_at(payload, name_end + 1, numbers)
    return values is not None and _all_text(values, TENANT)


values = st.sampled_from([TENANT, TENANT, b"globex", b"acm", b"", None, b"acme\x00"])


@st.composite
def binds(draw: Callable[..., Any]) -> tuple[bytes, bytes, tuple[int, ...]]:
    """(chunk, statement name learnt, tenant parameters): a Bind + Execute + Sync,
    often well formed with the tenant where it belongs, sometimes not, sometimes
    damaged anywhere."""
    name = draw(st.sampled_from([b"s1", b"s1", b"s2", b"", b"x" * 63, b"x" * 64]))
    count = draw(st.integers(0, 4))
    numbers = tuple(sorted(draw(st.sets(st.integers(1, count + 1), max_size=3))))
    params = tuple(
        draw(
            st.sampled_from([TENANT, TENANT, TENANT, TENANT, None, b"globex", b"acme\x00", b"acm"])
        )
        if number in numbers
        else draw(values)
        for number in range(1, count + 1)
    )
    formats = draw(
        st.sampled_from(
            [(), (), (0,), (1,), (2,), (0,) * count, (1,) * count, (0, 1, 0, 0)[:count], (1, 0)]
        )
    )
    bind = Bind(
        draw(st.sampled_from(["", "", "", "p"])),
        name.decode(),
        formats,
        params,
        draw(st.sampled_from([(), (0,), (1, 1)])),
    ).encode()
    damage = draw(st.sampled_from(["none"] * 4 + ["cut", "flip", "extend", "length", "pad"]))
    if damage == "cut":
        bind = bind[: draw(st.integers(0, len(bind) - 1))]
    elif damage == "flip":
        at = draw(st.integers(5, len(bind) - 1))
        bind = bind[:at] + bytes([draw(st.integers(0, 255))]) + bind[at + 1 :]
    elif damage == "extend":
        bind = bind + draw(st.binary(min_size=1, max_size=3))
    elif damage == "length":
        bind = bind[:1] + draw(st.integers(0, len(bind) + 3)).to_bytes(4, "big") + bind[5:]
    elif damage == "pad":  # bytes after the result formats, inside the message
        padded = bind[5:] + draw(st.binary(min_size=1, max_size=3))
        bind = bind[:1] + (len(padded) + 4).to_bytes(4, "big") + padded
    tail = draw(st.sampled_from(["es", "es", "des", "other"]))
    if tail == "other":
        chunk = bind + Execute("", 1).encode() + Sync().encode()
    else:
        chunk = _chunk(bind, tail == "des")
    learnt = draw(st.sampled_from([name, name, name, b"s3"]))
    return chunk, learnt, numbers


# What a statement is to the lane: plain (neither transaction control nor DEALLOCATE
# ALL), transaction control, or neither (DEALLOCATE ALL).
statement_kinds = st.sampled_from(["plain", "control", "other"])


def _may_take(kind: str, in_block: bool, splice: bool) -> bool:
    """Transaction control anywhere; with ``splice`` (rls/both, the tenant due)
    nothing else; in a block only a plain statement."""
    return kind == "control" or (not splice and (kind == "plain" or not in_block))


def _took(kind: str) -> int:
    """What client() returns for a request of a statement of ``kind`` it took."""
    return lane_module.TOOK_CONTROL if kind == "control" else True


@settings(max_examples=1500, deadline=None)
@given(case=binds(), in_block=st.booleans(), kind=statement_kinds, splice=st.booleans())
def test_the_lane_takes_a_bind_exactly_when_the_python_path_allows_it_by_its_bytes(
    case: tuple[bytes, bytes, tuple[int, ...]], in_block: bool, kind: str, splice: bool
) -> None:
    """Outside a block any statement taught; inside one (``in_block``) only a plain
    one or transaction control; and where rls/both must inject the tenant
    (``splice``) only transaction control."""
    chunk, name, numbers = case
    lane, ends, portals = _lane()
    learnt = lane.learn(name, numbers, INFO, "select", kind == "plain", kind == "control")
    assert learnt == (len(name) <= 63)
    expected = learnt and _may_take(kind, in_block, splice) and _python_takes(chunk, name, numbers)
    assert lane.client(chunk, in_block, splice) == (_took(kind) if expected else False)
    assert lane.outstanding is expected
    assert ends.upstream == ([chunk] if expected else [])
    assert portals == ({"": INFO} if expected else {})
    assert not ends.handed
    assert not ends.client


KNOWN_PARSE = Parse("", PREPARED, ()).encode()


@settings(max_examples=1000, deadline=None)
@given(
    case=binds(),
    prefix=st.sampled_from(["known", "known", "swapped", "other", "named", "cut", "long"]),
    cut=st.integers(0, 40),
    in_block=st.booleans(),
    kind=statement_kinds,
    splice=st.booleans(),
)
def test_the_lane_takes_a_known_parse_and_bind_exactly_when_the_python_path_would(
    case: tuple[bytes, bytes, tuple[int, ...]],
    prefix: str,
    cut: int,
    in_block: bool,
    kind: str,
    splice: bool,
) -> None:
    chunk, _, numbers = case
    parse = {
        "known": KNOWN_PARSE,
        # The same length, the tenant parameter elsewhere: only the bytes tell.
        "swapped": Parse("", SWAPPED, ()).encode(),
        "other": Parse("", PREPARED + " ", ()).encode(),
        "named": Parse("s1", PREPARED, ()).encode(),
        "cut": KNOWN_PARSE[: min(cut, len(KNOWN_PARSE) - 1)],
        "long": KNOWN_PARSE[:1] + (len(KNOWN_PARSE) + 3).to_bytes(4, "big") + KNOWN_PARSE[5:],
    }[prefix]
    lane, ends, portals = _lane()
    cache = _Cache()
    payload = KNOWN_PARSE[5:]
    assert lane.learn_parse(
        payload, numbers, INFO, "select", cache, kind == "plain", kind == "control"
    )
    expected = _may_take(kind, in_block, splice) and _python_takes(
        parse + chunk, b"", numbers, payload
    )
    assert lane.client(parse + chunk, in_block, splice) == (_took(kind) if expected else False)
    assert ends.upstream == ([parse + chunk] if expected else [])
    assert portals == ({"": INFO} if expected else {})
    if expected:
        lane.hand_over()
        assert ends.parses == [payload]
        assert cache.hits == 0  # counted when answered here, or by known_parse on hand-over


class _Cache:
    hits = 0


def test_a_bind_the_lane_forwarded_is_handed_over_before_the_next_chunk() -> None:
    lane, ends, _portals = _lane()
    lane.learn(b"s1", (1,), INFO, "select", True)
    chunk = _bound("s1", "acme", 1, describe=True, parse=False)
    before = time.perf_counter()
    assert lane.client(chunk, False)
    assert not lane.client(chunk, False)  # pipelined: the first request goes to the tracker first
    ((info, describe, started),) = ends.handed
    assert info is INFO
    assert describe
    assert before <= started <= time.perf_counter()
    assert not lane.outstanding
    assert lane.client(chunk, False)  # nothing outstanding again: its case
    lane.hand_over()
    lane.hand_over()  # once only
    assert len(ends.handed) == 2
    assert ends.upstream == [chunk, chunk]


def test_the_portal_map_is_bounded_as_record_portal_bounds_it() -> None:
    lane, _ends, portals = _lane()
    lane.attach(portals, 2)
    lane.learn(b"s1", (1,), INFO, "select", True)
    chunk = _bound("s1", "acme", 1, describe=False, parse=False)
    for size, after in ((2, {"a", "b", ""}), (3, {""})):
        portals.clear()
        portals.update({str(i): None for i in "ab"[:size]} | ({"c": None} if size == 3 else {}))
        assert lane.client(chunk, False)
        lane.hand_over()
        assert set(portals) == after


def test_what_the_lane_learns_and_forgets() -> None:
    lane, _ends, _portals = _lane()
    chunk = _bound("s1", "acme", 1, describe=False, parse=False)
    assert not lane.learn(b"s" * 64, (1,), INFO, "select", True)  # the Python way for long names
    assert not lane.learn(b"s1", tuple(range(1, 10)), INFO, "select", True)  # 9 tenant parameters
    assert not lane.learn(b"s1", (2, 1), INFO, "select", True)  # not ascending
    assert not lane.learn(b"s1", (0,), INFO, "select", True)
    assert lane.learnt == 0
    assert not lane.client(chunk, False)
    for number in range(6):
        assert lane.learn(f"t{number}".encode(), (1,), INFO, f"command{number}", True)
    assert not lane.learn(b"s1", (1,), INFO, "a seventh label", True)  # labels are kept for good
    lane, _ends, _portals = _lane()
    for number in range(16):
        assert lane.learn(f"t{number}".encode(), (1,), INFO, "select", True)
    assert lane.learnt == 16
    assert lane.learn(b"s1", (1,), INFO, "select", True)  # a full table is emptied first
    assert lane.learnt == 1
    assert lane.client(chunk, False)
    lane.hand_over()
    lane.forget()
    assert not lane.client(chunk, False)
    lane.learn(b"s1", (1,), INFO, "select", True)
    other: dict[str, Any] = {}
    lane.attach(other, 1000)  # a reload's new inspector: nothing it did not teach
    assert lane.learnt == 0
    assert not lane.client(chunk, False)
    lane.learn(b"s1", (1,), INFO, "select", True)
    assert lane.client(chunk, False)
    assert other == {"": INFO}


# --- the server side: the answer ----------------------------------------------------------

READY = ReadyForQuery("I").encode()
PLAIN_ANSWER = b"2\x00\x00\x00\x04" + CommandComplete("SELECT 0").encode() + READY
ROWDESC = RowDescription((FieldDescription("x", 0, 0, 23, 4, -1, 0),)).encode()
NOTICE = ErrorResponse((("S", "NOTICE"), ("C", "00000"), ("M", "hi")), notice=True).encode()
ERROR = ErrorResponse((("S", "ERROR"), ("V", "ERROR"), ("C", "22012"), ("M", "boom"))).encode()
TAGS = ["SELECT 1", "SELECT 0", "INSERT 0 7", "UPDATE 12", "SELECT", "SELECT 1" + "0" * 18, "x 5"]


@st.composite
def answers(draw: Callable[..., Any]) -> tuple[bool, bool, bytes]:
    """(describe, with a Parse, server chunk): the answer to a bound request, often
    plain and whole, sometimes with a part missing, out of order, extra or cut."""
    describe = draw(st.booleans())
    with_parse = draw(st.booleans())
    parts = [b"1\x00\x00\x00\x04"] if with_parse else []
    parts.append(b"2\x00\x00\x00\x04")
    if describe:
        parts.append(draw(st.sampled_from([ROWDESC, Empty("n").encode()])))
    parts += [DataRow((b"1",)).encode()] * draw(st.integers(0, 3))
    parts.append(CommandComplete(draw(st.sampled_from(TAGS))).encode())
    parts.append(ReadyForQuery(draw(st.sampled_from("IIITTTE"))).encode())
    damage = draw(st.sampled_from(["none"] * 4 + ["drop", "insert", "swap", "cut", "extra"]))
    if damage == "drop":
        del parts[draw(st.integers(0, len(parts) - 1))]
    elif damage == "insert":
        extra = draw(
            st.sampled_from([NOTICE, ERROR, ROWDESC, b"2\x00\x00\x00\x04", b"1\x00\x00\x00\x04"])
        )
        parts.insert(draw(st.integers(0, len(parts))), extra)
    elif damage == "swap" and len(parts) > 2:
        at = draw(st.integers(0, len(parts) - 2))
        parts[at], parts[at + 1] = parts[at + 1], parts[at]
    chunk = b"".join(parts)
    if damage == "cut":
        chunk = chunk[: draw(st.integers(0, len(chunk) - 1))]
    elif damage == "extra":
        chunk += draw(st.sampled_from([NOTICE, ReadyForQuery("I").encode(), b"Z\x00"]))
    return describe, with_parse, chunk


def _python_consumes(
    describe: bool, with_parse: bool, chunk: bytes, status: str, control: bool = False
) -> tuple[int, str] | None:
    """The row count and the status after, if pass_plain consumes all of ``chunk``
    for a bound request sent with the server in ``status`` and leaves the tracker
    idle in that status (``control``: in 'I' or 'T'); None otherwise."""
    tracker = ResponseTracker()
    tracker.status = status
    done: list[tuple[Pending, bool]] = []
    tracker.on_complete = lambda entry, ok: done.append((entry, ok))
    entry = Pending(Kind.EXECUTE, command="select")
    parsed: list[bool] = []
    tracker.expect_bound(entry, describe, parsed.append if with_parse else None)
    if tracker.pass_plain(chunk, 0) != len(chunk) or not tracker.idle:
        return None
    if tracker.status != status and not (control and tracker.status in ("I", "T")):
        return None
    assert done == [(entry, True)]
    assert parsed == ([True] if with_parse else [])
    return entry.rows, tracker.status


@settings(max_examples=1500, deadline=None)
@given(case=answers(), in_block=st.booleans(), control=st.booleans())
def test_the_lane_takes_an_answer_exactly_when_pass_plain_consumes_it_whole(
    case: tuple[bool, bool, bytes], in_block: bool, control: bool
) -> None:
    """Whole, and ending in the status the request was sent in (a change of status,
    e.g. an error in a block, goes the Python way), or for transaction control in
    either 'I' or 'T' (upstream() says which)."""
    describe, with_parse, chunk = case
    lane, ends, _portals = _lane()
    cache = _Cache()
    if with_parse:
        lane.learn_parse(KNOWN_PARSE[5:], (1,), INFO, "select", cache, not control, control)
        assert lane.client(_bound("", "acme", 1, describe=describe, parse=True), in_block)
    else:
        lane.learn(b"s1", (1,), INFO, "select", not control, control)
        assert lane.client(_bound("s1", "acme", 1, describe=describe, parse=False), in_block)
    consumed = _python_consumes(describe, with_parse, chunk, "T" if in_block else "I", control)
    if b"1" + b"0" * 18 in chunk:
        consumed = None  # more digits than the lane counts: the Python path counts them
    assert lane.upstream(chunk) == (None if consumed is None else consumed[1])
    assert not lane.outstanding
    rows = None if consumed is None else consumed[0]
    if rows is None:
        assert [(info, d) for info, d, _ in ends.handed] == [(INFO, describe)]
        assert ends.parses == [KNOWN_PARSE[5:] if with_parse else None]
        assert not ends.client
        assert cache.hits == 0
    else:
        assert not ends.handed
        assert ends.client == [chunk]
        _bytes_in, bytes_out, counted, commands = lane.take()
        assert (bytes_out, counted) == (len(chunk), rows)
        assert [(command, allowed) for command, allowed, _, _ in commands] == [("select", 1)]
        assert cache.hits == (1 if with_parse else 0)  # as known_parse counts it


def test_no_answer_is_taken_without_a_request() -> None:
    lane, ends, _portals = _lane()
    answer = (
        b"2\x00\x00\x00\x04" + CommandComplete("SELECT 0").encode() + ReadyForQuery("I").encode()
    )
    assert not lane.upstream(answer)
    assert not ends.client
    assert not ends.handed


# --- the tallies ---------------------------------------------------------------------------


def test_the_tallies_are_what_the_metrics_would_have_counted() -> None:
    bounds = (-1.0, 1e-12, 3600.0)  # every duration falls in bucket 2
    lane, ends, _portals = _lane(bounds)
    lane.learn(b"s1", (1,), INFO, "select", True)
    lane.learn(b"s2", (1,), PortalInfo(False, "update", None), "update", True)
    answer = (
        b"2\x00\x00\x00\x04" + CommandComplete("UPDATE 3").encode() + ReadyForQuery("I").encode()
    )
    sent = 0
    for name in ("s1", "s2", "s1"):
        chunk = _bound(name, "acme", 1, describe=False, parse=False)
        sent += len(chunk)
        assert lane.client(chunk, False)
        assert lane.upstream(answer)
    assert ends.marks == 1  # once per period between takes, not per statement
    bytes_in, bytes_out, rows, commands = lane.take()
    assert (bytes_in, bytes_out, rows) == (sent, 3 * len(answer), 9)
    by_command = {
        command: (allowed, buckets, seconds) for command, allowed, buckets, seconds in commands
    }
    assert set(by_command) == {"select", "update"}
    for command, count in (("select", 2), ("update", 1)):
        allowed, buckets, seconds = by_command[command]  # type: ignore[misc]
        assert allowed == count
        assert buckets == (0, 0, count, 0)
        assert 0 < seconds < 60
    assert lane.take() == (0, 0, 0, ())
    assert lane.client(_bound("s1", "acme", 1, describe=False, parse=False), False)
    assert ends.marks == 2


@given(seconds=st.floats(0, 100), bounds=st.lists(st.floats(0, 100), max_size=5))
def test_bucket_choice_is_bisect_left(seconds: float, bounds: list[float]) -> None:
    """The lane's bucket for a duration is metrics' (bisect_left); here with the
    measured duration replaced by a shift of the bounds: the bucket of d among
    bounds b is that of 0-ish among b - d."""
    ordered = tuple(sorted(bounds))
    lane, _ends, _portals = _lane(tuple(bound - seconds for bound in ordered))
    lane.learn(b"s1", (), INFO, "select", True)
    answer = (
        b"2\x00\x00\x00\x04" + CommandComplete("SELECT 0").encode() + ReadyForQuery("I").encode()
    )
    assert lane.client(_bound("s1", "acme", 1, describe=False, parse=False), False)
    assert lane.upstream(answer)
    ((_, _, buckets, measured),) = lane.take()[3]
    expected = bisect.bisect_left(ordered, seconds + measured)
    near = {bisect.bisect_left(ordered, seconds), expected}  # a bound within the few us measured
    assert buckets.index(1) in near


def test_the_lane_clock_is_perf_counter() -> None:
    before = time.perf_counter()
    clock = lane_module.clock()  # the lane's durations are measured on it
    assert before <= clock <= time.perf_counter()


def test_release_hands_over_and_lets_go() -> None:
    lane, ends, _portals = _lane()
    lane.learn(b"s1", (1,), INFO, "select", True)
    chunk = _bound("s1", "acme", 1, describe=False, parse=False)
    assert lane.client(chunk, False)
    lane.release()
    assert len(ends.handed) == 1
    assert not lane.outstanding
    assert lane.learnt == 0
    assert not lane.client(chunk, False)
    assert not lane.learn(b"s1", (1,), INFO, "select", True)
    assert lane.take()[0] == len(chunk)  # the tallies stay for the last flush


def test_a_lane_in_a_reference_cycle_is_collected() -> None:
    assert LANE is not None

    class Owner:
        def write(self, data: bytes) -> None:
            pass

        def hand(self, info: object, describe: bool, started: float, parse: object) -> None:
            pass

    owner = Owner()
    owner.lane = LANE(owner.write, owner.write, owner.hand, TENANT, MAX_MESSAGE)  # type: ignore[attr-defined]
    gone = weakref.ref(owner)
    del owner
    gc.collect()
    assert gone() is None


# --- in the session --------------------------------------------------------------------------


def test_the_session_takes_the_lane_and_hands_over() -> None:
    async def run() -> None:
        proxy = _proxy("enforce", False)
        session = proxy.session
        session.start_lane()
        lane = session._lane
        assert lane is not None
        server = _Server()

        def answer() -> None:
            session.upstream_data(server.answer(proxy.upstream.take()))
            assert proxy.client.take().endswith(ReadyForQuery("I").encode())

        session.client_data(Parse("s1", PREPARED, ()).encode() + Sync().encode())
        answer()
        chunk = _bound("s1", "acme", 1, describe=False, parse=False)
        session.client_data(chunk)  # the Python path allows it and teaches the lane
        answer()
        assert lane.learnt == 1
        assert lane.served == 0
        session.client_data(chunk)
        assert lane.outstanding
        assert session.busy
        assert not session.quiet
        assert session.tracker.idle  # the tracker knows nothing of it yet
        answer()
        assert lane.served == 1
        assert session.quiet
        # A second request before the answer: the lane's goes to the tracker first.
        session.client_data(chunk)
        session.client_data(chunk)
        assert not lane.outstanding
        assert session.tracker.outstanding == 6
        answer()
        assert session.tracker.idle
        assert lane.served == 1
        # A reload's inspector starts the lane afresh, recording into its own portals.
        old = cast(PolicyInspector, session.inspector)
        new = proxy.app._inspector(proxy.app.policy, session.info)
        session.replace_inspector(new)
        assert lane.learnt == 0
        session.client_data(Parse("s1", PREPARED, ()).encode() + Sync().encode())
        answer()  # the server already has s1: an error, then ReadyForQuery
        old._portals.clear()
        session.client_data(Parse("s9", PREPARED, ()).encode() + Sync().encode())
        answer()
        for _ in range(2):  # taught by the first Bind, served at the second
            session.client_data(_bound("s9", "acme", 1, describe=False, parse=False))
            answer()
        assert lane.served == 2
        assert "" in new._portals
        assert not old._portals

    asyncio.run(run())


def test_no_lane_when_every_statement_is_audited() -> None:
    async def run() -> None:
        proxy = _proxy("enforce", False)
        proxy.app.audit = _Audit()  # type: ignore[assignment]
        proxy.app._telemetry.clear()
        proxy.app._session_started(proxy.session)
        proxy.session.start_lane()
        assert proxy.session._lane is None

    asyncio.run(run())


@pytest.mark.parametrize("mode", ["enforce", "both", "rls"])
def test_inside_a_block_the_lane_takes_plain_statements_once_the_tenant_is_set(
    mode: str,
) -> None:
    """rls/both set the tenant per transaction: outside a block every statement
    needs it injected, so the lane takes no Execute there; inside one, once its
    first statement set it, the lane takes the plain statements, and transaction
    control anywhere (its answer changes the status: the tracker follows); an
    error, which ends the block's steady state, goes the Python way."""

    async def run() -> None:
        session, exchange = _served_session(mode)
        lane = session._lane
        injects = mode != "enforce"
        exchange(Parse("s1", PREPARED, ()).encode() + Sync().encode())
        exchange(Parse("c", "COMMIT", ()).encode() + Sync().encode())
        bind = _bound("s1", "acme", 1, describe=False, parse=False)
        commit = _control_bound("c", describe=False)
        for _ in range(2):  # the first teaches it; outside a block rls/both inject
            assert exchange(bind).endswith(READY)
        assert lane.served == (0 if injects else 1)
        exchange(Query("BEGIN").encode())
        served = lane.served
        for _ in range(3):  # rls/both: the first sets the block's tenant (Python)
            assert exchange(bind).endswith(ReadyForQuery("T").encode())
        assert lane.served == served + (2 if injects else 3)
        for _ in range(2):  # the first teaches it; transaction control, in a block too
            assert exchange(commit).endswith(READY)
            assert session.tracker.status == "I"
            exchange(Query("BEGIN").encode())  # seen twice: not known by its bytes yet
            assert session.tracker.status == "T"
        assert lane.served == served + (2 if injects else 3) + 1
        served = lane.served
        assert exchange(bind).endswith(ReadyForQuery("T").encode())  # the tenant again
        failed = exchange(_bound("s1", "acme", 3, describe=False, parse=False))
        assert failed.endswith(ReadyForQuery("E").encode())  # handed over, not answered
        assert session.tracker.status == "E"
        assert b"25P02" in exchange(bind)  # the block is aborted: the Python way
        exchange(Query("ROLLBACK").encode())
        assert lane.served == served + (0 if injects else 1)
        assert session.tracker.idle
        assert not session._lane_busy

    asyncio.run(run())


class _Audit:
    statements = True


def _served_session(
    mode: str = "enforce", policy: str = POLICY, tenant: str = "acme"
) -> tuple[Any, Callable[[bytes], bytes]]:
    """A session with its lane (enforce mode by default), and a function that sends
    a client chunk and returns what the client got back (the simulated server
    answers)."""
    proxy = _proxy(mode, False, policy=policy, tenant=tenant)
    session = proxy.session
    session.start_lane()
    assert session._lane is not None
    server = _Server()

    def exchange(chunk: bytes) -> bytes:
        session.client_data(chunk)
        session.upstream_data(server.answer(proxy.upstream.take()))
        return proxy.client.take()

    return session, exchange


def test_the_lane_forgets_what_a_change_of_the_statement_makes_untrue() -> None:
    """s1 re-prepared with the tenant in another place: a Bind that was right for
    the old text binds the key where the tenant must be now, and must be refused."""

    async def run() -> None:
        session, exchange = _served_session()
        lane = session._lane
        exchange(Parse("s1", PREPARED, ()).encode() + Sync().encode())
        bind = _bound("s1", "acme", 1, describe=False, parse=False)
        for _ in range(3):
            assert exchange(bind).endswith(READY)
        assert lane.served == 2
        exchange(Close("S", "s1").encode() + Sync().encode())
        assert lane.learnt == 0
        swapped = PREPARED.replace("tenant_id = $1 AND id = $2", "id = $1 AND tenant_id = $2")
        exchange(Parse("s1", swapped, ()).encode() + Sync().encode())
        answer = exchange(bind)
        assert b"42501" in answer
        assert b"wrong_tenant_param" in answer
        assert lane.served == 2

    asyncio.run(run())


def test_the_lane_takes_the_known_parse_of_the_unnamed_statement() -> None:
    """libpq's PQexecParams (pgbench -M extended): Parse + Bind + Describe + Execute +
    Sync of the unnamed statement, the same Parse every time."""

    async def run() -> None:
        session, exchange = _served_session()
        lane = session._lane
        inspector = cast(PolicyInspector, session.inspector)
        hits = []
        for key in (1, 1, 1, 3, 2, 1):  # 3 fails at run time, 2 raises a notice
            hits.append(inspector._cache.hits)
            assert exchange(_bound("", "acme", key, describe=True, parse=True)).endswith(READY)
            assert lane.learnt == 1  # taught when the server confirmed it the first time
        # The first is allowed by the Python path and teaches the lane; the error and
        # the notice are not the lane's answers: the request goes to the tracker.
        assert lane.served == 3
        assert [after - before for before, after in itertools.pairwise(hits)] == [0, 1, 1, 1, 1]
        assert session.tracker.idle
        # Another tenant's id: the lane declines, the Python path refuses.
        refused = exchange(_bound("", "globex", 1, describe=True, parse=True))
        assert b"wrong_tenant_param" in refused
        assert lane.served == 3
        # A Query drops the unnamed statement: the lane keeps the Parse, and when it
        # takes it again it has the inspector confirm it as the unnamed statement.
        exchange(Query("SELECT 1").encode())
        assert inspector._statements[""].confirmed is None
        assert lane.learnt == 1
        assert exchange(_bound("", "acme", 1, describe=True, parse=True)).endswith(READY)
        assert lane.served == 4
        (payload,) = inspector._known_parses
        assert inspector._statements[""].confirmed is inspector._known_parses[payload]
        assert not inspector._statements[""].pending

    asyncio.run(run())


def test_the_lane_takes_unnamed_parses_that_take_turns() -> None:
    """pgbench -M extended runs a transaction's statements as unnamed Parses that
    take turns.  Each is the lane's from its second time on: the lane keeps every
    Parse the server confirmed while known_parse knows it, and the inspector's
    registry holds, after each, the statement the server holds; when known_parse
    forgets a Parse (its table emptied), the lane declines it."""

    async def run() -> None:
        session, exchange = _served_session()
        lane = session._lane
        inspector = cast(PolicyInspector, session.inspector)
        texts = (PREPARED, PREPARED.replace("id = $2", "id > $2"), PREPARED + " + 0")
        for round_ in range(4):
            for sql in texts:
                chunk = _bound("", "acme", 1, describe=True, parse=True, sql=sql)
                served = lane.served
                assert exchange(chunk).endswith(READY)
                assert lane.served == served + (round_ > 0)
                confirmed = inspector._statements[""].confirmed
                assert confirmed is not None
                assert confirmed.parse.query == sql
                assert not inspector._statements[""].pending
        assert lane.learnt == 3
        inspector._known_parses.clear()  # as remember_parse empties it when full
        served = lane.served
        exchange(_bound("", "acme", 1, describe=True, parse=True, sql=PREPARED))
        assert lane.served == served  # the Python path, which knows it no more

    asyncio.run(run())


# The chunks that change what the lane may know, and the ones it takes: a script of
# these makes the session differential test (``_run``) exercise the lane's
# forgetting far more often than its general vocabulary does.
_LANE_VOCABULARY = [
    Query("SELECT balance FROM accounts WHERE tenant_id = 'acme' AND id = 1").encode(),
    Query("SELECT balance FROM accounts WHERE tenant_id = 'acme' AND id = 1").encode(),
    Query("SELECT balance FROM accounts WHERE tenant_id = 'globex' AND id = 1").encode(),
    _bound("", "acme", 1, describe=False, parse=False),  # the unnamed statement, no Parse
    Parse("s1", PREPARED, ()).encode() + Sync().encode(),
    Close("S", "s1").encode() + Parse("s1", SWAPPED, ()).encode() + Sync().encode(),
    Close("S", "s1").encode() + Parse("s1", PREPARED, ()).encode() + Sync().encode(),
    _bound("s1", "acme", 1, describe=False, parse=False),
    _bound("s1", "acme", 2, describe=True, parse=False),
    _bound("", "acme", 1, describe=True, parse=True),
    _bound("", "acme", 1, describe=True, parse=True, sql=SWAPPED),
    _bound("", "acme", 1, describe=True, parse=True, sql=TURN),
    _bound("", "acme", 2, describe=False, parse=True, sql=TURN),
    Query("SELECT 1").encode(),
]


@settings(max_examples=300, deadline=None)
@given(
    script=st.lists(
        st.tuples(st.sampled_from(_LANE_VOCABULARY).map(lambda chunk: [chunk]), st.none()),
        min_size=1,
        max_size=10,
    )
)
def test_the_lane_matches_the_general_path_as_statements_change(
    script: list[tuple[list[bytes], int | None]],
) -> None:
    asyncio.run(_run(script, "enforce", False, None))


# --- known simple Queries (enforce mode) ------------------------------------------------------

TENANT_ONLY = frozenset({"acme"})
QUERY_A = Query("SELECT 1").encode()
QUERY_B = Query("SELECT balance FROM accounts WHERE tenant_id = 'acme'").encode()
QUERY_C = Query("SELECT balance FROM accounts WHERE tenant_id = 'globex'").encode()


def _known_messages() -> dict[bytes, tuple[str, Any, str, frozenset[str]]]:
    """An analysis cache's known_messages: no constants, this tenant's, another's."""
    return {
        QUERY_A: ("SELECT 1", object(), "select", frozenset()),
        QUERY_B: ("SELECT balance ... 'acme'", object(), "select", TENANT_ONLY),
        QUERY_C: ("SELECT balance ... 'globex'", object(), "select", frozenset({"globex"})),
    }


@settings(max_examples=800, deadline=None)
@given(
    base=st.sampled_from([QUERY_A, QUERY_B, QUERY_C, Query("SELECT 2").encode()]),
    damage=st.sampled_from(["none", "none", "cut", "extra", "pipelined", "flip"]),
    at=st.integers(0, 60),
    taught=st.booleans(),
    in_block=st.booleans(),
    max_message=st.sampled_from([MAX_MESSAGE, 20]),
)
def test_the_lane_takes_a_query_exactly_when_known_query_allows_it_by_its_bytes(
    base: bytes, damage: str, at: int, taught: bool, in_block: bool, max_message: int
) -> None:
    """PolicyInspector.known_query's table lookup: the whole chunk is a message it
    allowed, with no tenant constant or only this tenant's; and only after the
    inspector taught it (learn_queries), until forget()."""
    chunk = {
        "none": base,
        "cut": base[: min(at, len(base) - 1)],
        "extra": base + b"\x00",
        "pipelined": base + Sync().encode(),
        "flip": base[: min(at, len(base) - 1)] + b"!" + base[min(at, len(base) - 1) + 1 :],
    }[damage]
    known = _known_messages()
    lane, ends, _portals = _lane(max_message=max_message)
    cache = _Cache()
    if taught:
        lane.learn_queries(known, {}, TENANT_ONLY, cache)
    found = known.get(chunk)
    expected = (
        taught
        and found is not None
        and found[3] in (frozenset(), TENANT_ONLY)
        and len(chunk) - 5
        <= max_message  # a longer one: _known_query leaves it to the general path
    )
    assert lane.client(chunk, in_block) is expected
    assert ends.upstream == ([chunk] if expected else [])
    assert cache.hits == (1 if expected else 0)  # counted when sent, as known_query counts
    if expected:
        assert found is not None
        lane.hand_over()
        assert [(sql, command) for sql, command, _ in ends.queries] == [(found[0], "select")]
    assert not ends.handed
    lane.forget()
    assert not lane.client(chunk, in_block)


def test_a_lane_takes_no_query_by_its_bytes_unless_made_to() -> None:
    """rls/both: of the known messages only the transaction control (in every state:
    nothing is injected before it), since any other statement may need the tenant
    injected; and a lane without materialize_query could not hand a Query over."""
    assert LANE is not None
    ends = _Ends()
    plain = LANE(ends.upstream.append, ends.client.append, ends.hand, TENANT, MAX_MESSAGE)
    plain.attach({}, 1000)
    plain.learn_queries(_known_messages(), _known_messages(), TENANT_ONLY, _Cache())
    plain.learn_shapes({}, lambda sql, message, analysis: True)
    assert plain.learnt == 0
    assert not plain.client(QUERY_A, True)
    enforce, _ends, _portals = _lane(splice=b"SELECT 1;")  # no session makes this one
    enforce.learn_queries(_known_messages(), {}, TENANT_ONLY, _Cache())
    assert not enforce.client(QUERY_A, False, True)  # where the tenant is due: not by bytes
    assert enforce.client(QUERY_A, False, False)
    known = _known_messages()
    controls = {QUERY_B: known[QUERY_B]}  # as if it were transaction control
    for in_block, splice in ((False, True), (True, True), (True, False)):
        rls, rls_ends, _portals = _lane(known_queries=False, splice=b"SELECT 1;")
        rls.learn_queries(known, controls, TENANT_ONLY, _Cache())
        assert rls.learnt == 1
        assert not rls.client(QUERY_A, in_block, splice)
        assert rls.client(QUERY_B, in_block, splice) == lane_module.TOOK_CONTROL
        assert rls_ends.upstream == [QUERY_B]  # as it is: nothing goes before it


def test_the_session_reads_what_the_lane_took_by_the_lanes_constants() -> None:
    """Session.client_data tells the injector what the lane took by these numbers."""
    assert session_module._TOOK == 1  # True: a request the injector does not follow
    assert session_module._TOOK_CONTROL == lane_module.TOOK_CONTROL
    assert lane_module.TOOK_SPLICED not in (0, 1, lane_module.TOOK_CONTROL)


# What rls/both put in front of a one-statement Query that needs the tenant, and the
# answer to it: set_config's one row (TenantInjector.query_prefix).
SPLICE = b"SELECT pg_catalog.set_config('tenantgate.tenant', 'acme', true);"
SET_CONFIG_PARTS = [
    RowDescription((FieldDescription("set_config", 0, 0, 25, -1, -1, 0),)).encode(),
    DataRow((b"acme",)).encode(),
    CommandComplete("SELECT 1").encode(),
]


@st.composite
def query_answers(draw: Callable[..., Any], spliced: bool = False) -> bytes:
    """The answer to a Query: one statement's result (after set_config's when
    ``spliced``), often whole, sometimes damaged, sometimes two statements' or an
    empty query's."""
    parts = list(SET_CONFIG_PARTS) if spliced else []
    if draw(st.booleans()):
        parts.append(ROWDESC)
    parts += [DataRow((b"1",)).encode()] * draw(st.integers(0, 3))
    parts.append(CommandComplete(draw(st.sampled_from(TAGS))).encode())
    parts.append(ReadyForQuery(draw(st.sampled_from("IIITTTE"))).encode())
    damage = draw(
        st.sampled_from(
            ["none"] * 4 + ["drop", "insert", "replace", "swap", "cut", "extra", "empty"]
        )
    )
    extras = [NOTICE, ERROR, ROWDESC, DataRow((b"2",)).encode(), CommandComplete("x").encode()]
    if damage == "drop":
        del parts[draw(st.integers(0, len(parts) - 1))]
    elif damage == "insert":
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(extras)))
    elif damage == "replace":
        parts[draw(st.integers(0, len(parts) - 1))] = draw(st.sampled_from(extras))
    elif damage == "swap" and len(parts) > 2:
        at = draw(st.integers(0, len(parts) - 2))
        parts[at], parts[at + 1] = parts[at + 1], parts[at]
    elif damage == "empty":
        parts = [Empty("I").encode(), ReadyForQuery("I").encode()]
    chunk = b"".join(parts)
    if damage == "cut":
        chunk = chunk[: draw(st.integers(0, len(chunk) - 1))]
    elif damage == "extra":
        chunk += draw(st.sampled_from([NOTICE, ReadyForQuery("I").encode(), b"Z\x00"]))
    return chunk


def _tracker_output(tracker: ResponseTracker, chunk: bytes) -> bytes | None:
    """What the session's _upstream_chunk passes to the client of ``chunk`` (pass_plain,
    else route per message), or None if the tracker cannot consume all of it."""
    out = bytearray()
    pos = tracker.pass_plain(chunk, 0)
    out += chunk[:pos]
    while len(chunk) - pos >= 5:
        end = pos + 1 + uint32_at(chunk, pos + 1)
        if end > len(chunk):
            return None
        try:
            action, replacement = tracker.route(chunk[pos], chunk[pos + 5 : end])
        except TenantgateError:
            return None
        if action is Action.FORWARD:
            out += chunk[pos:end]
        elif replacement is not None:
            out += replacement
        pos = tracker.pass_plain(chunk, end)
        out += chunk[end:pos]
    return bytes(out) if pos == len(chunk) else None


def _message_types(chunk: bytes) -> bytes:
    frames, consumed = scan_frames(chunk, 1 << 20)
    return bytes(t for t, _, _ in frames) if consumed == len(chunk) else b"?"


SHAPE_TEXT = b"SELECT x FROM t WHERE tenant_id = 'acme' AND id = 5"


def _query_lane(kind: str, in_block: bool) -> tuple[Lane, _Ends, bytes]:
    """A lane that has just forwarded a Query of ``kind``, and the Query it sent."""
    lane, ends, _portals = _lane(known_queries=kind == "plain", splice=SPLICE)
    known = _known_messages()
    if kind == "spliced":
        at = SHAPE_TEXT.index(b"'acme'")
        checks = array.array("I", (LANE_TENANT, at, at + 6)).tobytes()
        routes = {b"'acme'" + digits_of(SHAPE_TEXT): (checks, "select", object())}
        lane.learn_shapes(routes, lambda sql, message, analysis: True)
        sent = Query((SPLICE + SHAPE_TEXT).decode()).encode()
        took = lane.client(Query(SHAPE_TEXT.decode()).encode(), in_block, True)
        assert took == lane_module.TOOK_SPLICED
    else:
        controls = {QUERY_A: known[QUERY_A]} if kind == "control" else {}
        lane.learn_queries(known, controls, TENANT_ONLY, _Cache())
        sent = QUERY_A
        took = lane.client(QUERY_A, in_block, kind == "control")
        assert took == (lane_module.TOOK_CONTROL if kind == "control" else 1)
    assert ends.upstream == [sent]
    return lane, ends, sent


@pytest.mark.parametrize("kind", ["plain", "control", "spliced"])
@settings(max_examples=1000, deadline=None)
@given(data=st.data(), in_block=st.booleans())
def test_the_lane_takes_a_query_answer_exactly_when_the_tracker_consumes_it_whole(
    kind: str, data: st.DataObject, in_block: bool
) -> None:
    """One statement's result, whole, consumed by the tracker for the Query's entry,
    ending in the status the Query was sent in (transaction control: in 'I' or 'T',
    whichever it says); after set_config's one row if spliced, which the client
    does not get (hidden_statements).  The client gets what the tracker would pass
    on, and upstream() the status, which the session gives its tracker; anything
    else is handed over (with the splice, if spliced)."""
    chunk = data.draw(query_answers(spliced=kind == "spliced"))
    lane, ends, _sent = _query_lane(kind, in_block)
    status = "T" if in_block else "I"
    tracker = ResponseTracker()
    tracker.status = status
    done: list[tuple[Pending, bool]] = []
    tracker.on_complete = lambda entry, ok: done.append((entry, ok))
    entry = Pending(Kind.QUERY, command="select")
    if kind == "spliced":
        entry.hidden_statements = frozenset((0,))
    tracker.expect(entry)
    output = _tracker_output(tracker, chunk)
    whole = re.fullmatch(b"TDCT?D*CZ" if kind == "spliced" else b"T?D*CZ", _message_types(chunk))
    ends_in = tracker.status in ("I", "T") if kind == "control" else tracker.status == status
    taken = output is not None and tracker.idle and ends_in and whole is not None
    counted = (
        chunk[scan_frames(chunk, 1 << 20)[0][2][2] :] if whole and kind == "spliced" else chunk
    )
    if b"1" + b"0" * 18 in counted:  # the client's statement's rows, not set_config's
        taken = False  # more digits than the lane counts: the Python path counts them
    assert lane.upstream(chunk) == (tracker.status if taken else None)
    assert not lane.outstanding
    if not taken:
        assert [(sql, command) for sql, command, _ in ends.queries] == [
            ((SHAPE_TEXT.decode() if kind == "spliced" else "SELECT 1"), "select")
        ]
        assert ends.spliced == [kind == "spliced"]
        assert not ends.client
    else:
        assert output is not None
        assert done == [(entry, True)]
        assert not ends.queries
        assert ends.client == [output]
        if kind == "spliced":  # all but the first three messages
            assert output == chunk[scan_frames(chunk, 1 << 20)[0][3][1] - 5 :]
        _bytes_in, bytes_out, counted, commands = lane.take()
        assert (bytes_out, counted) == (len(output), entry.rows)
        assert [(command, allowed) for command, allowed, _, _ in commands] == [("select", 1)]


def test_the_session_lane_takes_known_queries_and_forgets_them() -> None:
    """A Query allowed twice by the Python path is then the lane's (until the
    registry changes: an unnamed Parse); another tenant's literal stays refused."""

    async def run() -> None:
        session, exchange = _served_session()
        lane = session._lane
        inspector = cast(PolicyInspector, session.inspector)
        mine = Query("SELECT balance FROM accounts WHERE tenant_id = 'acme' AND id = 1").encode()
        hits = []
        for _ in range(5):
            hits.append(inspector._cache.hits)
            assert exchange(mine).endswith(READY)
        hits.append(inspector._cache.hits)
        # Analysed, then known by its text, then by its bytes (Python), then the lane's.
        assert lane.served == 2
        assert [after - before for before, after in itertools.pairwise(hits)][2:] == [1, 1, 1]
        theirs = Query(
            "SELECT balance FROM accounts WHERE tenant_id = 'globex' AND id = 1"
        ).encode()
        for _ in range(3):
            assert b"42501" in exchange(theirs)
        assert exchange(mine).endswith(READY)
        assert lane.served == 3
        exchange(Parse("", PREPARED, ()).encode() + Sync().encode())
        assert lane.learnt == 0  # the registry changed: the next one goes the Python way
        assert exchange(mine).endswith(READY)
        assert lane.served == 3
        assert exchange(mine).endswith(READY)
        assert lane.served == 4
        assert session.tracker.idle

    asyncio.run(run())


# --- Queries of a text shape (every mode; W3's and W4's inlined values) -----------------------

SHAPED = "SELECT balance FROM {table} WHERE tenant_id = {tenant} AND id = {key}"


def _shaped(table: str = "accounts", tenant: str = "'acme'", key: object = 1) -> bytes:
    return Query(SHAPED.format(table=table, tenant=tenant, key=key)).encode()


# Literals as textshapes reads them: int4 or numeric by their digits (leading zeros,
# ten digits and more), a minus glued on; and what is no integer literal at all.
shaped_keys = st.one_of(
    st.integers(-3, 3),
    st.integers(0, 10**12),
    st.sampled_from(
        [2147483647, 2147483648, -2147483647, -2147483648, "0002147483647", "00000000007"]
    ),
    st.sampled_from(["1.5", "1e3", "-0", "+4", "(5)", "$1", "4 ", "0x1F", "3 -- 'acme'"]),
)
shaped_tenants = st.sampled_from(
    ["'acme'"] * 6 + ["'globex'", "'acme '", "'ac''me'", "'acme'::text", "E'acme'", "acme"]
)
shaped_queries = st.builds(
    _shaped,
    st.sampled_from(["accounts", "accounts", "ledger1", "ledger2"]),
    shaped_tenants,
    shaped_keys,
)


@pytest.mark.parametrize("mode", ["enforce", "both", "rls"])
@settings(max_examples=120, deadline=None)
@given(
    script=st.lists(
        st.tuples(
            st.one_of(
                shaped_queries,
                shaped_queries,
                shaped_queries,
                st.sampled_from(
                    [
                        Query("BEGIN").encode(),
                        Query("COMMIT").encode(),
                        Query("ROLLBACK").encode(),
                        # The registry changes: the lane forgets the shapes.
                        Parse("", PREPARED, ()).encode() + Sync().encode(),
                    ]
                ),
            ).map(lambda chunk: [chunk]),
            st.one_of(st.none(), st.none(), st.integers(1, 40)),
        ),
        min_size=1,
        max_size=16,
    )
)
def test_the_lane_takes_shaped_queries_as_the_general_path_allows_them(
    mode: str, script: list[tuple[list[bytes], int | None]]
) -> None:
    """Texts of one digit key with other digits, other tenants' literals, other
    literal kinds, and table names that differ in a digit: the session with the
    lane sends, answers and counts (cache hits and misses included) exactly what
    the general path does."""
    teach = [([_shaped(key=key)], None) for key in (7, 8, 9)]  # analysed, shaped, taught
    # BEGIN and COMMIT known by their bytes (analysed, cached, known), then a block.
    start = [([Query(word).encode()], None) for word in ("BEGIN", "COMMIT") * 3 + ("BEGIN",)]
    asyncio.run(_run([*start, *teach, *teach, *script], mode, False, None))


@pytest.mark.parametrize("mode", ["enforce", "both"])
def test_the_session_lane_takes_new_texts_of_a_known_shape(mode: str) -> None:
    """pgbench's simple protocol: a new value inlined in every statement.  Once the
    Python path has answered a text by its shape and allowed it, the lane takes
    the texts of that shape with this tenant's literal (in rls/both only inside a
    block that has the tenant), each counted as the general path counts it: a
    text-shape hit, a cache miss, the text filed; a text the cache holds, another
    tenant's literal or a text of another table go the Python way."""

    async def run() -> None:
        session, exchange = _served_session(mode)
        lane = session._lane
        inspector = cast(PolicyInspector, session.inspector)
        cache = inspector._cache
        ready = READY if mode == "enforce" else ReadyForQuery("T").encode()
        if mode != "enforce":
            exchange(Query("BEGIN").encode())
        for key in (10, 11, 12):  # analysed; by the text shape's literal scan; digit key
            assert exchange(_shaped(key=key)).endswith(ready)
        assert lane.learnt == 1
        served, misses, shape_hits = lane.served, cache.misses, cache.text_shapes.hits
        for key in range(20, 30):
            assert exchange(_shaped(key=key)).endswith(ready)
        assert lane.served == served + 10
        assert (cache.misses, cache.text_shapes.hits) == (misses + 10, shape_hits + 10)
        assert SHAPED.format(table="accounts", tenant="'acme'", key=29) in cache._entries
        hits = cache.hits
        assert exchange(_shaped(key=29)).endswith(ready)  # a text the cache holds
        assert (lane.served, cache.hits) == (served + 10, hits + 1)
        served = lane.served
        for tenant in ("'globex'", "'acmf'", "'ACME'"):  # 'acmf': this digit key's length
            assert b"42501" in exchange(_shaped(tenant=tenant, key=31))
        assert lane.served == served
        served -= 10
        if mode == "enforce":
            assert exchange(_shaped(table="ledger1", key=32)).endswith(ready)  # shaped anew
            assert exchange(_shaped(key=33)).endswith(ready)
            assert lane.served == served + 11
        assert session.tracker.idle
        assert not session._lane_busy

    asyncio.run(run())


@pytest.mark.parametrize(("mode", "per_block"), [("both", 4), ("rls", 2)])
def test_the_lane_takes_whole_blocks_in_rls_and_both_mode(mode: str, per_block: int) -> None:
    """W3 in the simple protocol: BEGIN, statements with new values inlined, COMMIT.
    Once the Python path has allowed each of them, the lane takes them all (in rls
    mode, which files no text shapes, BEGIN and COMMIT): the transaction control
    by its bytes, as it is, with the tracker's status and the injector following
    it; the block's first statement with the tenant spliced in front, set_config's
    row hidden from the client; the rest as they are.  Outside a block a
    statement is spliced too."""

    async def run() -> None:
        proxy = _proxy(mode)
        session = proxy.session
        session.start_lane()
        lane = session._lane
        injector = session.injector
        assert lane is not None
        assert injector is not None
        server = _Server()

        def exchange(chunk: bytes) -> tuple[bytes, bytes]:
            session.client_data(chunk)
            sent = proxy.upstream.take()
            session.upstream_data(server.answer(sent))
            return sent, proxy.client.take()

        begin, commit = Query("BEGIN").encode(), Query("COMMIT").encode()
        for key in range(3):  # BEGIN, COMMIT: analysed, cached, known; the shapes taught
            for chunk in (begin, _shaped(key=10 + key), _shaped(key=20 + key), commit):
                exchange(chunk)
        rows = (
            _row_description() + DataRow((b"10",)).encode() + CommandComplete("SELECT 1").encode()
        )
        served = lane.served
        for key in range(30, 35):
            answer = CommandComplete("BEGIN").encode() + ReadyForQuery("T").encode()
            assert exchange(begin) == (begin, answer)
            assert session.tracker.status == "T"
            assert not injector.tenant_in_block
            spliced = Query(
                injector.query_prefix.decode()
                + SHAPED.format(table="accounts", tenant="'acme'", key=key)
            ).encode()
            assert exchange(_shaped(key=key)) == (spliced, rows + ReadyForQuery("T").encode())
            assert injector.tenant_in_block
            chunk = _shaped(key=key + 10)
            assert exchange(chunk) == (chunk, rows + ReadyForQuery("T").encode())
            answer = CommandComplete("COMMIT").encode() + READY
            assert exchange(commit) == (commit, answer)
            assert session.tracker.status == "I"
            assert not injector.tenant_in_block
        assert lane.served == served + 5 * per_block
        text = SHAPED.format(table="accounts", tenant="'acme'", key=50)
        sent, answer = exchange(_shaped(key=50))  # autocommit: spliced as well
        assert sent == Query(injector.query_prefix.decode() + text).encode()
        assert answer == rows + READY
        shapes = mode == "both"  # rls mode files no text shapes (below)
        assert lane.served == served + 5 * per_block + (1 if shapes else 0)
        assert session.tracker.idle
        assert not session._lane_busy

    asyncio.run(run())


def test_rls_mode_files_no_digit_key_for_the_lane() -> None:
    """rls mode needs no tenant literal, so the tenant's string literal is not a
    tenant value, and textshapes files no text with other string literals under a
    digit key (their values vary); such Queries stay on the Python path."""

    async def run() -> None:
        session, exchange = _served_session("rls")
        exchange(Query("BEGIN").encode())
        for key in range(10, 20):
            assert exchange(_shaped(key=key)).endswith(ReadyForQuery("T").encode())
        assert session._lane.learnt == 0
        assert session._lane.served == 0

    asyncio.run(run())


# Literals around the int4 bound (with leading zeros, a minus), and what is no integer.
INT4_EDGES = [
    "2147483647",
    "2147483648",
    "-2147483647",
    "-2147483648",
    "02147483647",
    "0002147483648",
    "0999999999",
    "1000000000",
    "9999999999",
    "4294967296",
    "00000000000",
]


@settings(max_examples=1500, deadline=None)
@given(
    literal=st.one_of(
        st.sampled_from(INT4_EDGES),
        st.from_regex(r"\A-?[0-9]{1,14}\Z"),
        st.text(alphabet="0123456789-'ab ", min_size=0, max_size=14),
    ),
    numeric=st.booleans(),
    tenant=st.sampled_from(["'acme'", "'acme'", "'acmf'", "'ACME'", "'gbex'", "'acm''"]),
    table=st.sampled_from("1112"),
    filed=st.booleans(),
)
def test_a_shapes_checks_read_a_text_as_textshapes_does(
    literal: str, numeric: bool, tenant: str, table: str, filed: bool
) -> None:
    """_lane.c's checks of a text: CHECK_DIGIT the byte at its place (a digit of a
    table name here), CHECK_TENANT the tenant's string literal byte for byte,
    CHECK_INT4 / CHECK_NUMERIC a literal's kind as textshapes._kind reads it (int4
    or numeric, by the digits after a minus), failing anything that is not a
    minus and digits; and the lane sends the Query only if file_shaped agrees."""
    head = f"SELECT x FROM t{table} WHERE tenant_id = {tenant} AND id = "
    text = (head + literal).encode()
    tenant_at = head.index("tenant_id = ") + len("tenant_id = ")
    checks = array.array(
        "I",
        (
            LANE_DIGIT,
            head.index(" WHERE") - 1,
            ord("1"),
            LANE_TENANT,
            tenant_at,
            tenant_at + 6,
            LANE_NUMERIC if numeric else LANE_INT4,
            len(head),
            len(text),
        ),
    ).tobytes()
    lane, ends, _portals = _lane()
    calls: list[tuple[str, bytes, object]] = []

    def file_shaped(sql: str, message: bytes, analysis: object) -> bool:
        calls.append((sql, message, analysis))
        return filed

    analysis = object()
    digits = digits_of(text)
    # The route is found by the digit key of any text of this tenant's literal's length.
    lane.learn_shapes({b"'acme'" + digits: (checks, "select", analysis)}, file_shaped)
    chunk = Query(text.decode()).encode()
    is_integer = re.fullmatch(r"-?[0-9]+", literal) is not None
    fits = (
        table == "1"
        and tenant == "'acme'"
        and is_integer
        and (_kind(literal) in ("N", "n")) == numeric
    )
    assert lane.client(chunk, False) is (fits and filed)
    assert calls == ([(text.decode(), chunk, analysis)] if fits else [])
    assert ends.upstream == ([chunk] if fits and filed else [])


def test_shape_routes_are_per_tenant() -> None:
    """The routes are shared by the cache's sessions, keyed by the tenant's string
    literal: another tenant's lane finds none of them, even for a text with its
    own literal where this tenant's was."""
    text = b"SELECT x FROM t WHERE tenant_id = 'acme' AND id = 5"
    digits = digits_of(text)
    at = text.index(b"'acme'")
    checks = array.array("I", (LANE_TENANT, at, at + 6)).tobytes()
    routes = {b"'acme'" + digits: (checks, "select", object())}
    other, _ends, _portals = _lane(tenant=b"gbex")
    other.learn_shapes(routes, lambda sql, message, analysis: True)
    for tenant in (b"'acme'", b"'gbex'"):
        assert not other.client(Query(text.replace(b"'acme'", tenant).decode()).encode(), False)
    mine, _ends, _portals = _lane()
    mine.learn_shapes(routes, lambda sql, message, analysis: True)
    assert mine.client(Query(text.replace(b"5", b"7").decode()).encode(), False)


@pytest.mark.parametrize("mode", ["enforce", "both"])
def test_tenants_named_with_digits_share_a_digit_key_but_not_a_verdict(mode: str) -> None:
    """Tenant ids with digits: 't1' and 't2' give their texts one digit key.  The
    lane still tells them apart twice over: a digit inside a string literal is one
    of the digits the checks pin (CHECK_DIGIT), and the tenant literal's bytes are
    compared too (CHECK_TENANT).  A session of t1 whose lane knows the shape must
    refuse the same text with 't2'."""

    async def run() -> None:
        policy = POLICY.replace("acme:", "t1:").replace("acme_app", "t1_app")
        policy = policy.replace("globex:", "t2:").replace("globex_app", "t2_app")
        session, exchange = _served_session(mode, policy, tenant="t1")
        lane = session._lane
        ready = READY if mode == "enforce" else ReadyForQuery("T").encode()
        if mode != "enforce":
            exchange(Query("BEGIN").encode())
        for key in range(10, 20):
            assert exchange(_shaped(tenant="'t1'", key=key)).endswith(ready)
        assert lane.served > 0
        for key in range(20, 25):
            served = lane.served
            assert b"42501" in exchange(_shaped(tenant="'t2'", key=key))
            assert lane.served == served
            if mode != "enforce":
                exchange(Query("ROLLBACK").encode())
                exchange(Query("BEGIN").encode())
                exchange(_shaped(tenant="'t1'", key=key))  # the block's tenant again
            served = lane.served
            assert exchange(_shaped(tenant="'t1'", key=key + 10)).endswith(ready)
            assert lane.served == served + 1

    asyncio.run(run())
