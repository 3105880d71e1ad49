"""tracker: pairing requests sent upstream with the server's responses."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantgate.errors import PgError, RemoteProtocolError, rejected
from tenantgate.protocol.backend import (
    BackendMessage,
    CommandComplete,
    CopyResponse,
    DataRow,
    Empty,
    ErrorResponse,
    FieldDescription,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    RawBackend,
    ReadyForQuery,
    RowDescription,
    decode_backend,
)
from tenantgate.tracker import Action, Kind, Pending, ResponseTracker, _count_rows

FORWARD, DROP, REPLACE = Action.FORWARD, Action.DROP, Action.REPLACE

ROWDESC = RowDescription((FieldDescription("x", 0, 0, 23, 4, -1, 0),))
ROW = DataRow((b"1",))
PARSE_OK, BIND_OK, CLOSE_OK = Empty("1"), Empty("2"), Empty("3")
NO_DATA, EMPTY_QUERY, SUSPENDED, COPY_DONE = Empty("n"), Empty("I"), Empty("s"), Empty("c")
COPY_DATA = RawBackend("d", b"1\n")
NOTICE = ErrorResponse((("S", "NOTICE"), ("C", "00000"), ("M", "hi")), notice=True)
PARAM_STATUS = ParameterStatus("TimeZone", "UTC")
NOTIFY = NotificationResponse(1, "chan", "payload")
REJECTION = rejected("scope", "orders needs a tenant predicate", "Add WHERE tenant_id = ...")


def rfq(status: str = "I") -> ReadyForQuery:
    return ReadyForQuery(status)


def done(tag: str) -> CommandComplete:
    return CommandComplete(tag)


def error(sqlstate: str = "22012", severity: str = "ERROR") -> ErrorResponse:
    return ErrorResponse((("S", severity), ("V", severity), ("C", sqlstate), ("M", "boom")))


def route(tracker: ResponseTracker, message: BackendMessage) -> tuple[Action, bytes | None]:
    data = message.encode()
    return tracker.route(data[0], data[5:])


def actions(tracker: ResponseTracker, messages: list[BackendMessage]) -> list[Action]:
    out = []
    for message in messages:
        action, replacement = route(tracker, message)
        assert (replacement is not None) == (action is REPLACE)
        out.append(action)
    return out


class Outcomes:
    """Records on_done results per entry name."""

    def __init__(self) -> None:
        self.results: list[tuple[str, bool]] = []

    def entry(
        self, kind: Kind, name: str, injected: bool = False, rejection: PgError | None = None
    ) -> Pending:
        def on_done(ok: bool) -> None:
            self.results.append((name, ok))

        return Pending(kind, injected=injected, rejection=rejection, on_done=on_done)


# --- simple query -------------------------------------------------------------------------


def test_simple_query_forwarded_and_completed() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    completed: list[Pending] = []
    tracker.on_complete = lambda entry, ok: completed.append(entry)
    entry = seen.entry(Kind.QUERY, "q")
    tracker.expect(entry)
    assert not tracker.idle
    assert tracker.busy_with_client_work
    msgs: list[BackendMessage] = [ROWDESC, ROW, ROW, done("SELECT 2"), rfq("I")]
    assert actions(tracker, msgs) == [FORWARD] * 5
    assert tracker.idle
    assert tracker.outstanding == 0
    assert not tracker.busy_with_client_work
    assert seen.results == [("q", True)]
    assert completed == [entry]
    assert entry.rows == 2


def test_multi_statement_query_counts_rows_and_statements() -> None:
    tracker = ResponseTracker()
    entry = Pending(Kind.QUERY)
    tracker.expect(entry)
    msgs: list[BackendMessage] = [
        done("BEGIN"),
        done("INSERT 0 3"),
        EMPTY_QUERY,
        ROWDESC,
        ROW,
        done("SELECT 1"),
        rfq("T"),
    ]
    assert actions(tracker, msgs) == [FORWARD] * 7
    assert entry.statement_index == 4
    assert entry.rows == 4
    assert tracker.status == "T"


def test_query_error_fails_entry_but_waits_for_ready() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    tracker.expect(seen.entry(Kind.QUERY, "q"))
    assert actions(tracker, [done("INSERT 0 1"), error()]) == [FORWARD, FORWARD]
    assert not tracker.idle  # ReadyForQuery still ends the entry
    assert seen.results == []
    assert actions(tracker, [rfq("E")]) == [FORWARD]
    assert seen.results == [("q", False)]
    assert tracker.status == "E"
    assert tracker.idle


def test_empty_query() -> None:
    tracker = ResponseTracker()
    tracker.expect(Pending(Kind.QUERY))
    assert actions(tracker, [EMPTY_QUERY, rfq()]) == [FORWARD, FORWARD]
    assert tracker.idle


def test_queries_are_paired_in_order() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    tracker.expect(seen.entry(Kind.QUERY, "a"))
    tracker.expect(seen.entry(Kind.QUERY, "b"))
    actions(tracker, [done("SELECT 0"), rfq(), error(), rfq()])
    assert seen.results == [("a", True), ("b", False)]


# --- extended protocol -----------------------------------------------------------------


def extended_batch(seen: Outcomes, tracker: ResponseTracker, prefix: str = "") -> None:
    for kind, name in [
        (Kind.PARSE, "parse"),
        (Kind.BIND, "bind"),
        (Kind.DESCRIBE_PORTAL, "describe"),
        (Kind.EXECUTE, "execute"),
        (Kind.SYNC, "sync"),
    ]:
        tracker.expect(seen.entry(kind, prefix + name))


def test_extended_query_happy_path() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    extended_batch(seen, tracker)
    assert tracker.outstanding == 5
    msgs: list[BackendMessage] = [PARSE_OK, BIND_OK, ROWDESC, ROW, done("SELECT 1"), rfq()]
    assert actions(tracker, msgs) == [FORWARD] * 6
    assert seen.results == [
        ("parse", True),
        ("bind", True),
        ("describe", True),
        ("execute", True),
        ("sync", True),
    ]
    assert tracker.idle


@pytest.mark.parametrize("last", [ROWDESC, NO_DATA])
def test_describe_statement(last: BackendMessage) -> None:
    tracker = ResponseTracker()
    tracker.expect(Pending(Kind.DESCRIBE_STATEMENT))
    tracker.expect(Pending(Kind.SYNC))
    msgs = [ParameterDescription((23,)), last, rfq()]
    assert actions(tracker, msgs) == [FORWARD] * 3
    assert tracker.idle


def test_describe_portal_no_data_and_close() -> None:
    tracker = ResponseTracker()
    for kind in (Kind.DESCRIBE_PORTAL, Kind.CLOSE, Kind.SYNC):
        tracker.expect(Pending(kind))
    assert actions(tracker, [NO_DATA, CLOSE_OK, rfq()]) == [FORWARD] * 3
    assert tracker.idle


def test_execute_counts_rows() -> None:
    tracker = ResponseTracker()
    execute = Pending(Kind.EXECUTE)
    tracker.expect(execute)
    tracker.expect(Pending(Kind.SYNC))
    actions(tracker, [ROW, ROW, ROW, done("UPDATE 3"), rfq()])
    assert execute.rows == 3


def test_error_skips_until_sync() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    extended_batch(seen, tracker)
    assert actions(tracker, [PARSE_OK, error("22P02")]) == [FORWARD, FORWARD]
    # Bind failed; describe and execute are skipped by the server; only Sync remains.
    assert tracker.outstanding == 1
    assert seen.results == [
        ("parse", True),
        ("bind", False),
        ("describe", False),
        ("execute", False),
    ]
    assert actions(tracker, [rfq("I")]) == [FORWARD]
    assert seen.results[-1] == ("sync", True)
    assert tracker.idle


def test_pipeline_error_in_first_batch_only() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    extended_batch(seen, tracker, "1.")
    extended_batch(seen, tracker, "2.")
    msgs: list[BackendMessage] = [
        PARSE_OK,
        BIND_OK,
        ROWDESC,
        error(),
        rfq(),
        PARSE_OK,
        BIND_OK,
        ROWDESC,
        ROW,
        done("SELECT 1"),
        rfq(),
    ]
    assert actions(tracker, msgs) == [FORWARD] * len(msgs)
    assert dict(seen.results) == {
        "1.parse": True,
        "1.bind": True,
        "1.describe": True,
        "1.execute": False,
        "1.sync": True,
        "2.parse": True,
        "2.bind": True,
        "2.describe": True,
        "2.execute": True,
        "2.sync": True,
    }
    assert tracker.idle


def test_portal_suspension() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    tracker.expect(seen.entry(Kind.BIND, "bind"))
    tracker.expect(seen.entry(Kind.EXECUTE, "exec1"))
    tracker.expect(seen.entry(Kind.EXECUTE, "exec2"))
    tracker.expect(seen.entry(Kind.SYNC, "sync"))
    msgs: list[BackendMessage] = [BIND_OK, ROW, ROW, SUSPENDED, ROW, done("SELECT 3"), rfq("T")]
    assert actions(tracker, msgs) == [FORWARD] * 7
    assert [name for name, ok in seen.results if ok] == ["bind", "exec1", "exec2", "sync"]
    assert tracker.status == "T"


# --- COPY -----------------------------------------------------------------------------


def test_copy_in_inside_query() -> None:
    tracker = ResponseTracker()
    tracker.expect(Pending(Kind.QUERY))
    msgs: list[BackendMessage] = [CopyResponse("G", 0, (0,)), done("COPY 2"), rfq()]
    assert actions(tracker, msgs) == [FORWARD] * 3
    assert tracker.idle


def test_copy_out_inside_query() -> None:
    tracker = ResponseTracker()
    entry = Pending(Kind.QUERY)
    tracker.expect(entry)
    msgs: list[BackendMessage] = [
        CopyResponse("H", 0, (0,)),
        COPY_DATA,
        COPY_DATA,
        COPY_DONE,
        done("COPY 2"),
        rfq(),
    ]
    assert actions(tracker, msgs) == [FORWARD] * 6
    assert tracker.idle
    assert entry.rows == 2


def test_copy_in_failure_inside_query() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    tracker.expect(seen.entry(Kind.QUERY, "copy"))
    msgs: list[BackendMessage] = [CopyResponse("G", 0, ()), error("57014"), rfq()]
    assert actions(tracker, msgs) == [FORWARD] * 3
    assert seen.results == [("copy", False)]


@pytest.mark.parametrize(
    "responses",
    [
        pytest.param([CopyResponse("G", 1, (1, 1)), done("COPY 5")], id="copy-in"),
        pytest.param([CopyResponse("H", 0, ()), COPY_DATA, COPY_DONE, done("COPY 1")], id="out"),
    ],
)
def test_copy_inside_execute(responses: list[BackendMessage]) -> None:
    tracker = ResponseTracker()
    for kind in (Kind.PARSE, Kind.BIND, Kind.EXECUTE, Kind.SYNC):
        tracker.expect(Pending(kind))
    msgs: list[BackendMessage] = [PARSE_OK, BIND_OK, *responses, rfq()]
    assert actions(tracker, msgs) == [FORWARD] * len(msgs)
    assert tracker.idle


# --- async messages -------------------------------------------------------------------


@pytest.mark.parametrize("message", [NOTICE, PARAM_STATUS, NOTIFY], ids=repr)
def test_async_messages_forwarded_anywhere(message: BackendMessage) -> None:
    tracker = ResponseTracker()
    assert actions(tracker, [message]) == [FORWARD]  # idle
    tracker.expect(Pending(Kind.QUERY, injected=True))
    tracker.expect(Pending(Kind.PARSE))
    tracker.expect(Pending(Kind.SYNC))
    # Async messages never advance or disturb the pairing, even inside injected entries.
    msgs: list[BackendMessage] = [message, done("SELECT 1"), message, rfq(), message, PARSE_OK]
    assert actions(tracker, msgs) == [FORWARD, DROP, FORWARD, DROP, FORWARD, FORWARD]
    assert tracker.outstanding == 1
    assert actions(tracker, [message, rfq()]) == [FORWARD, FORWARD]
    assert tracker.idle


# --- injected entries, rejections, hidden statements ----------------------------------


def test_injected_query_responses_are_dropped() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    completed: list[Pending] = []
    tracker.on_complete = lambda entry, ok: completed.append(entry)
    tracker.expect(seen.entry(Kind.QUERY, "injected", injected=True))
    assert not tracker.busy_with_client_work
    client = Pending(Kind.QUERY)
    tracker.expect(client)
    assert tracker.busy_with_client_work
    msgs: list[BackendMessage] = [ROWDESC, ROW, done("SELECT 1"), rfq("T")]
    assert actions(tracker, msgs) == [DROP] * 4
    assert seen.results == [("injected", True)]
    assert completed == []  # injected entries are not reported to on_complete
    assert tracker.status == "T"
    assert actions(tracker, [done("SELECT 0"), rfq("T")]) == [FORWARD, FORWARD]
    assert completed == [client]


def test_injected_extended_entries_then_client_entries() -> None:
    tracker = ResponseTracker()
    for kind in (Kind.PARSE, Kind.BIND, Kind.EXECUTE):
        tracker.expect(Pending(kind, injected=True))
    for kind in (Kind.PARSE, Kind.BIND, Kind.EXECUTE, Kind.SYNC):
        tracker.expect(Pending(kind))
    msgs: list[BackendMessage] = [
        PARSE_OK,  # injected
        BIND_OK,
        ROW,
        done("SELECT 1"),
        PARSE_OK,  # the client's
        BIND_OK,
        ROW,
        done("SELECT 1"),
        rfq("T"),
    ]
    expected = [DROP] * 4 + [FORWARD] * 5
    assert actions(tracker, msgs) == expected
    assert tracker.idle
    assert tracker.status == "T"


def test_rejected_query_error_is_replaced() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    tracker.expect(seen.entry(Kind.QUERY, "q", rejection=REJECTION))
    action, replacement = route(tracker, error("42601"))
    assert action is REPLACE
    assert replacement is not None
    shown = decode_backend(replacement[0], replacement[5:])
    assert isinstance(shown, ErrorResponse)
    assert shown.sqlstate == "42501"
    assert (shown.get("M") or "").startswith("tenantgate: scope: ")
    assert shown.get("H") == REJECTION.hint
    assert shown.fields == tuple(REJECTION.fields())
    assert actions(tracker, [rfq()]) == [FORWARD]
    assert seen.results == [("q", False)]


def test_rejection_keeps_other_errors() -> None:
    # A cancel or a FATAL is not the planted syntax error: the client sees the real one.
    tracker = ResponseTracker()
    tracker.expect(Pending(Kind.QUERY, rejection=REJECTION))
    assert actions(tracker, [error("57014"), rfq()]) == [FORWARD, FORWARD]


def test_rejected_parse_replaces_error_and_skips_to_sync() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    tracker.expect(seen.entry(Kind.PARSE, "parse", rejection=REJECTION))
    tracker.expect(seen.entry(Kind.BIND, "bind"))
    tracker.expect(seen.entry(Kind.EXECUTE, "exec"))
    tracker.expect(seen.entry(Kind.SYNC, "sync"))
    action, replacement = route(tracker, error("42601"))
    assert action is REPLACE
    assert replacement is not None
    assert replacement == ErrorResponse.from_error(REJECTION).encode()
    assert tracker.outstanding == 1
    assert actions(tracker, [rfq()]) == [FORWARD]
    assert seen.results == [("parse", False), ("bind", False), ("exec", False), ("sync", True)]


def test_hidden_first_statement_of_query() -> None:
    tracker = ResponseTracker()
    entry = Pending(Kind.QUERY, hidden_statements=frozenset({0}))
    tracker.expect(entry)
    msgs: list[BackendMessage] = [
        ROWDESC,  # SELECT set_config(...) injected by the proxy
        ROW,
        done("SELECT 1"),
        ROWDESC,  # the client's statement
        ROW,
        ROW,
        done("SELECT 2"),
        rfq(),
    ]
    assert actions(tracker, msgs) == [DROP, DROP, DROP, FORWARD, FORWARD, FORWARD, FORWARD, FORWARD]
    assert entry.statement_index == 2


def test_hidden_statements_in_the_middle_and_end() -> None:
    tracker = ResponseTracker()
    tracker.expect(Pending(Kind.QUERY, hidden_statements=frozenset({1, 3})))
    msgs: list[BackendMessage] = [
        done("BEGIN"),
        done("SELECT 1"),  # hidden 1
        done("UPDATE 2"),
        done("SELECT 1"),  # hidden 3
        rfq("T"),
    ]
    assert actions(tracker, msgs) == [FORWARD, DROP, FORWARD, DROP, FORWARD]


def test_error_in_hidden_statement_is_shown() -> None:
    # If the proxy's own prefix fails, the client must learn that its query did not run,
    # and must get the ReadyForQuery that ends its request.
    tracker = ResponseTracker()
    tracker.expect(Pending(Kind.QUERY, hidden_statements=frozenset({0})))
    assert actions(tracker, [error(), rfq()]) == [FORWARD, FORWARD]


# --- transaction status ----------------------------------------------------------------


def test_transaction_status_follows_ready_for_query() -> None:
    tracker = ResponseTracker()
    assert tracker.status == "I"
    for status in ("T", "E", "I", "T"):
        tracker.expect(Pending(Kind.SYNC))
        route(tracker, rfq(status))
        assert tracker.status == status


@pytest.mark.parametrize("payload", [b"X", b""])
def test_invalid_ready_for_query_status(payload: bytes) -> None:
    tracker = ResponseTracker()
    tracker.expect(Pending(Kind.SYNC))
    with pytest.raises(RemoteProtocolError):
        tracker.route(ord("Z"), payload)


# --- unpairable responses ---------------------------------------------------------------


@pytest.mark.parametrize("message", [ROW, rfq(), PARSE_OK, done("SELECT 1"), COPY_DATA])
def test_response_with_nothing_outstanding(message: BackendMessage) -> None:
    with pytest.raises(RemoteProtocolError, match="unexpected"):
        route(ResponseTracker(), message)


def test_unsolicited_error_forwarded_when_idle() -> None:
    tracker = ResponseTracker()
    assert actions(tracker, [error("57P01", "FATAL")]) == [FORWARD]
    assert tracker.idle


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (Kind.BIND, PARSE_OK),
        (Kind.PARSE, BIND_OK),
        (Kind.PARSE, rfq()),
        (Kind.EXECUTE, rfq()),
        (Kind.CLOSE, ROWDESC),
        (Kind.EXECUTE, ROWDESC),
        (Kind.DESCRIBE_PORTAL, ParameterDescription(())),
        (Kind.SYNC, ROW),
        (Kind.QUERY, PARSE_OK),
        (Kind.QUERY, CopyResponse("W", 0, ())),
        (Kind.BIND, SUSPENDED),
        (Kind.DESCRIBE_STATEMENT, COPY_DATA),
    ],
)
def test_unexpected_response_for_head(kind: Kind, message: BackendMessage) -> None:
    tracker = ResponseTracker()
    tracker.expect(Pending(kind))
    with pytest.raises(RemoteProtocolError):
        route(tracker, message)


def test_fail_all_resolves_everything_as_failed() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    extended_batch(seen, tracker)
    tracker.expect(seen.entry(Kind.QUERY, "inj", injected=True))
    completed: list[Pending] = []
    tracker.on_complete = lambda entry, ok: completed.append(entry)
    tracker.fail_all()
    assert tracker.idle
    assert [ok for _, ok in seen.results] == [False] * 6
    # Statements only (the Execute), and not the injected entry.
    assert [entry.kind for entry in completed] == [Kind.EXECUTE]


def test_rejection_with_malformed_error_payload_is_protocol_error() -> None:
    tracker = ResponseTracker()
    tracker.expect(Pending(Kind.QUERY, rejection=PgError("42501", "x")))
    with pytest.raises(RemoteProtocolError):
        tracker.route(ord("E"), b"Cxx")


# --- bugs -------------------------------------------------------------------------------
# PostgreSQL can report an error while processing Sync itself: the implicit transaction
# of an extended-protocol batch commits at Sync, so a deferred constraint violation or a
# serialization failure at commit arrives as ErrorResponse *after* the Execute's
# CommandComplete, followed by ReadyForQuery (postgres.c: Sync clears
# doing_extended_query_message, so no skip-till-Sync starts, and ReadyForQuery follows).


def test_error_at_sync_commit() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    for kind, name in [(Kind.PARSE, "p"), (Kind.BIND, "b"), (Kind.EXECUTE, "e"), (Kind.SYNC, "s")]:
        tracker.expect(seen.entry(kind, name))
    msgs: list[BackendMessage] = [PARSE_OK, BIND_OK, done("INSERT 0 1"), error("23505"), rfq("I")]
    assert actions(tracker, msgs) == [FORWARD] * 5
    assert tracker.idle
    assert tracker.status == "I"
    assert [name for name, _ in seen.results] == ["p", "b", "e", "s"]


def test_error_at_sync_commit_in_pipeline() -> None:
    tracker, seen = ResponseTracker(), Outcomes()
    for prefix in ("1.", "2."):
        for kind, name in [(Kind.PARSE, "p"), (Kind.BIND, "b"), (Kind.EXECUTE, "e")]:
            tracker.expect(seen.entry(kind, prefix + name))
        tracker.expect(seen.entry(Kind.SYNC, prefix + "s"))
    msgs: list[BackendMessage] = [
        PARSE_OK,
        BIND_OK,
        done("INSERT 0 1"),
        error("40001"),  # could not serialize, reported at commit during Sync
        rfq("I"),
        PARSE_OK,
        BIND_OK,
        done("INSERT 0 1"),
        rfq("I"),
    ]
    assert actions(tracker, msgs) == [FORWARD] * len(msgs)
    assert dict(seen.results)["2.e"] is True
    assert tracker.idle


def test_error_at_injected_sync() -> None:
    tracker = ResponseTracker()
    tracker.expect(Pending(Kind.EXECUTE, injected=True))
    tracker.expect(Pending(Kind.SYNC, injected=True))
    msgs: list[BackendMessage] = [done("SELECT 1"), error("40001"), rfq("I")]
    assert actions(tracker, msgs) == [DROP, DROP, DROP]
    assert tracker.idle


def test_messages_sent_after_an_error_and_before_sync_are_skipped() -> None:
    """The error arrives before the client sent the rest of its segment (libpq pipelines)."""
    tracker, seen = ResponseTracker(), Outcomes()
    for kind, name in [(Kind.PARSE, "p1"), (Kind.BIND, "b1"), (Kind.EXECUTE, "e1")]:
        tracker.expect(seen.entry(kind, name))
    assert actions(tracker, [PARSE_OK, error("22012")]) == [FORWARD, FORWARD]
    # The rest of the segment arrives now: the server will answer none of it.
    for kind, name in [(Kind.PARSE, "p2"), (Kind.BIND, "b2"), (Kind.EXECUTE, "e2")]:
        tracker.expect(seen.entry(kind, name))
    tracker.expect(seen.entry(Kind.QUERY, "q"))
    tracker.expect(seen.entry(Kind.SYNC, "s"))
    assert actions(tracker, [rfq("I")]) == [FORWARD]
    assert tracker.idle
    outcomes = dict(seen.results)
    assert outcomes["p1"] is True
    assert [outcomes[n] for n in ("b1", "e1", "p2", "b2", "e2", "q")] == [False] * 6
    # After the Sync, requests are paired with responses again.
    tracker.expect(seen.entry(Kind.QUERY, "q2"))
    assert actions(tracker, [done("SELECT 1"), rfq("I")]) == [FORWARD, FORWARD]
    assert dict(seen.results)["q2"] is True


def rows_by_slicing(payload: bytes) -> int:
    """The row count of a CommandComplete payload, read the plain way: the reference."""
    tag = payload[:-1] if payload.endswith(b"\x00") else payload
    head, space, count = tag.rpartition(b" ")
    return int(count) if space and head and count.isdigit() else 0


@settings(max_examples=300, deadline=None, database=None)
@given(
    st.one_of(
        st.builds(
            lambda tag, rows, nul: tag + str(rows).encode() + nul,
            st.sampled_from([b"SELECT ", b"INSERT 0 ", b"COPY ", b"UPDATE ", b"X", b" ", b""]),
            st.integers(0, 10**20),
            st.sampled_from([b"\x00", b""]),
        ),
        st.binary(max_size=16),
        st.text("0123456789 A\x00\u0663", max_size=12).map(str.encode),
    ),
    st.binary(max_size=3),
    st.binary(max_size=3),
)
def test_row_count_read_in_place(payload: bytes, before: bytes, after: bytes) -> None:
    """Read in place from a larger buffer, the count is what slicing and int() give."""
    entry = Pending(Kind.QUERY)
    buffer = before + payload + after
    _count_rows(entry, buffer, len(before), len(before) + len(payload))
    assert entry.rows == rows_by_slicing(payload)
