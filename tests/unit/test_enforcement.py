"""enforcement: what the per-statement fast paths (``known_query``, ``known_parse``) may answer.

``remember_query`` may only record what ``inspect_query`` allowed with nothing
session-specific left to check, ``known_query`` answers from that table or
from the analysis cache without a parse (known text, known text shape), and
it must answer None whenever the general path could decide differently for
this session.  ``known_parse`` answers only for the exact bytes of the
unnamed-statement Parse last allowed, and leaves the inspector as
``inspect_parse`` would (every Bind still checked).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tenantgate.analysis import AnalysisCache, AnalysisPolicy
from tenantgate.enforcement import MAX_KNOWN_PARSE_BYTES, MAX_KNOWN_PARSES, PolicyInspector
from tenantgate.protocol.frontend import Bind, Parse, Query

POLICY = AnalysisPolicy(scoped_tables={"orders": "tenant_id"}, shared_tables=frozenset({"plans"}))


def inspector(
    cache: AnalysisCache, tenant: str = "acme", *, dry_run: bool = False, timeout: int | None = None
) -> PolicyInspector:
    return PolicyInspector(cache, tenant, timeout, dry_run)


def run(inspect: PolicyInspector, sql: str) -> tuple[bool, bool]:
    """(allowed by inspect_query, known afterwards) for one Query, the way the session calls."""
    message = Query(sql).encode()
    allowed = inspect.inspect_query(sql) is None
    if allowed:
        inspect.query_sent()
        inspect.remember_query(message)
    return allowed, inspect.known_query(message) is not None


def test_allowed_text_is_known_for_its_tenant_only() -> None:
    cache = AnalysisCache(POLICY)
    acme, globex = inspector(cache, "acme"), inspector(cache, "globex")
    sql = "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 1"
    message = Query(sql).encode()
    assert globex.known_query(message) is None  # nothing known yet: the general path decides
    # Allowed once: the cache has its analysis, so it is known (answered without a parse).
    assert run(acme, sql) == (True, True)
    # The exact message is remembered on its second sight (the call above was that).
    assert message in cache.known_messages
    known = acme.known_query(message)
    assert known is not None
    assert (known.sql, known.command) == (sql, "select")
    assert globex.known_query(message) is None  # the shared table never allows it for globex
    assert globex.inspect_query(sql) is not None  # and the general path refuses it
    # Texts without tenant constants are the same for every tenant.
    free = "SELECT id FROM plans"
    run(globex, free)
    assert run(acme, free) == (True, True)
    assert globex.known_query(Query(free).encode()) is not None


def test_new_texts_of_a_known_shape_need_no_parse() -> None:
    cache = AnalysisCache(POLICY)
    acme, globex = inspector(cache, "acme"), inspector(cache, "globex")
    assert run(acme, "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 10") == (True, True)
    misses = cache.misses
    # W4: every text new, literals inlined; the text shape answers.
    for n in range(11, 20):
        known = acme.known_query(
            Query(f"SELECT id FROM orders WHERE tenant_id = 'acme' AND id = {n}").encode()
        )
        assert known is not None
        assert known.command == "select"
    assert cache.text_shapes.hits == 9
    assert cache.misses == misses + 9  # filed as the general path files them
    # Another tenant's value in a known shape: the general path (which refuses it).
    other = Query("SELECT id FROM orders WHERE tenant_id = 'gbex' AND id = 77").encode()
    assert acme.known_query(other) is None
    assert globex.known_query(other) is None  # 'gbex' is not globex either
    assert inspector(cache, "gbex").known_query(other) is not None
    # An unknown shape, a malformed or partial message: nothing to answer, nothing filed.
    files = len(cache)
    assert (
        acme.known_query(Query("SELECT item FROM orders WHERE tenant_id = 'acme'").encode()) is None
    )
    good = Query("SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 42").encode()
    assert acme.known_query(good[:-1]) is None
    assert acme.known_query(good + good) is None
    assert acme.known_query(good[:5] + b"SELECT 1\x00 \x00") is None
    assert acme.known_query(good[:-3] + b"\xff\xfe\x00") is None
    # The first part of a longer message that happens to end in NUL: not a whole Query
    # (the server would read what follows as more of its text).
    longer = b"Q" + (len(good) + 9).to_bytes(4, "big") + good[5:]
    assert acme.known_query(longer) is None
    assert len(cache) == files


def test_refused_and_special_texts_are_never_known() -> None:
    cache = AnalysisCache(POLICY)
    acme = inspector(cache, timeout=1000)
    for sql in (
        "SELECT * FROM orders",  # missing predicate
        "SELECT * FROM orders WHERE tenant_id = 'globex'",  # wrong tenant
        "SELECT pg_sleep(1)",  # denied function
        "SET statement_timeout = 500",  # checked against the tenant's limit each time
        "DEALLOCATE ALL",
        "RESET ALL;",
    ):
        _, known = run(acme, sql)
        assert not known, sql
        assert cache.known_messages.get(Query(sql).encode()) is None
    dry = inspector(AnalysisCache(POLICY), dry_run=True)
    assert run(dry, "SELECT * FROM orders") == (True, False)  # forwarded, but not remembered


def test_known_query_drops_the_unnamed_statement_like_query_sent() -> None:
    cache = AnalysisCache(POLICY)
    acme = inspector(cache)
    sql = "SELECT id FROM orders WHERE tenant_id = 'acme'"
    run(acme, sql)
    run(acme, sql)
    parse = Parse("", "SELECT id FROM orders WHERE tenant_id = $1")
    assert acme.inspect_parse(parse) is None
    acme.parse_resolved(parse, ok=True)
    assert acme._statements[""].confirmed is not None
    assert acme.known_query(Query(sql).encode()) is not None
    assert "" not in acme._statements or acme._statements[""].confirmed is None


def test_the_table_is_bounded() -> None:
    cache = AnalysisCache(POLICY, maxsize=8)
    acme = inspector(cache)
    for n in range(30):
        run(acme, f"SELECT id FROM orders WHERE tenant_id = 'acme' AND id = {n}")
        run(acme, f"SELECT id FROM orders WHERE tenant_id = 'acme' AND id = {n}")
        assert len(cache.known_messages) <= 8
    assert cache.known_messages


TEXTS = st.sampled_from(
    [
        "SELECT id FROM orders WHERE tenant_id = 'acme'",
        "SELECT id FROM orders WHERE tenant_id = 'globex'",
        "SELECT id FROM orders WHERE tenant_id = 'acme' OR true",
        "SELECT id FROM orders",
        "SELECT id FROM plans",
        "UPDATE orders SET item = 'x' WHERE tenant_id = 'acme'",
        "DELETE FROM orders WHERE tenant_id = 'globex' AND id = 1",
        "BEGIN; SELECT 1; COMMIT",
        "SELECT set_config('app.tenant_id', 'globex', false)",
        "SET statement_timeout = 50",
        "SET statement_timeout = 5000",
        "SELECT 1; SELECT id FROM orders WHERE tenant_id = 'globex'",
        # Texts of one text shape (the fast path answers new ones without a parse).
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 1",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 2",
        "SELECT id FROM orders WHERE tenant_id = 'gbex' AND id = 3",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = -4",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = -5",
        "UPDATE orders SET item = 'y' WHERE tenant_id = 'acme'",
        "UPDATE orders SET item = 'y' WHERE tenant_id = 'glob'",
    ]
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["acme", "globex"]), TEXTS), max_size=20))
def test_known_query_never_disagrees_with_inspect_query(calls: list[tuple[str, str]]) -> None:
    cache = AnalysisCache(POLICY)
    sessions = {t: inspector(cache, t, timeout=1000) for t in ("acme", "globex")}
    for tenant, sql in calls:
        session = sessions[tenant]
        if session.known_query(Query(sql).encode()) is not None:
            # Whatever the fast path lets through, the general path allows too.
            assert session.inspect_query(sql) is None
        run(session, sql)


def test_repeated_parses_keep_each_sessions_verdict() -> None:
    """Verdicts are kept per analysis object: the cached analysis of one text is shared
    by every session, its verdict is not (tenant constants, timeout limits)."""
    cache = AnalysisCache(POLICY)
    acme, globex = inspector(cache, "acme"), inspector(cache, "globex", timeout=1000)
    own = "SELECT id FROM orders WHERE tenant_id = 'acme'"
    slow = "SET statement_timeout = 5000"
    for _ in range(3):  # the first sight fills the memo, the later ones read it
        assert acme.inspect_parse(Parse("", own)) is None
        assert globex.inspect_parse(Parse("", own)) is not None
        assert acme.inspect_parse(Parse("", slow)) is None
        assert globex.inspect_parse(Parse("", slow)) is not None
    assert acme.last_analysis is cache.get_or_analyse(slow)  # one shared analysis


def parse_once(inspect: PolicyInspector, parse: Parse) -> bool:
    """What the session's one-pass path does with a Parse it does not know: allowed?"""
    payload = parse.encode()[5:]
    known = inspect.known_parse(payload)
    if known is not None:
        assert known == parse
        return True
    allowed = inspect.inspect_parse(parse) is None
    if allowed:
        inspect.remember_parse(payload, parse)
    return allowed


def bind_allowed(inspect: PolicyInspector, tenant: str) -> bool:
    return inspect.inspect_bind(Bind("", "", (), (tenant.encode(),))) is None


def test_known_parse_answers_for_the_same_bytes_only() -> None:
    cache = AnalysisCache(POLICY)
    acme = inspector(cache)
    parse = Parse("", "SELECT id FROM orders WHERE tenant_id = $1")
    payload = parse.encode()[5:]
    assert acme.known_parse(payload) is None  # nothing remembered yet
    assert parse_once(acme, parse)
    acme.parse_resolved(parse, ok=True)
    hits = cache.hits
    known = acme.known_parse(payload)
    assert known is parse
    assert cache.hits == hits + 1  # counted as the analysis lookup it replaces
    assert acme._statements[""].pending[-1].parse is parse  # registered as inspect_parse does
    assert acme.last_analysis is cache.get_or_analyse(parse.query)
    assert bind_allowed(acme, "acme")
    assert not bind_allowed(acme, "globex")  # the Bind is still checked every time
    acme.parse_resolved(known, ok=True)
    assert acme._statements[""].confirmed is not None
    assert not acme._statements[""].pending
    # Other bytes: other parameter types, another text, a name.
    for other in (
        Parse("", parse.query, (25,)),
        Parse("", "SELECT id FROM orders WHERE tenant_id = $1 "),
        Parse("s1", parse.query),
    ):
        assert acme.known_parse(other.encode()[5:]) is None


def test_refused_named_and_dry_run_parses_are_never_known() -> None:
    cache = AnalysisCache(POLICY)
    acme = inspector(cache)
    refused = Parse("", "SELECT id FROM orders")
    assert not parse_once(acme, refused)
    acme.remember_parse(refused.encode()[5:], refused)  # even if asked: nothing pending
    assert acme.known_parse(refused.encode()[5:]) is None
    named = Parse("s1", "SELECT id FROM orders WHERE tenant_id = $1")
    assert parse_once(acme, named)
    assert acme.known_parse(named.encode()[5:]) is None
    dry = inspector(AnalysisCache(POLICY), dry_run=True)
    assert parse_once(dry, refused)  # forwarded in a dry run, counted as would-reject
    assert dry.last_would_reject
    assert dry.known_parse(refused.encode()[5:]) is None
    # A Parse allowed after a refused one is remembered; the refusal did not stick.
    own = Parse("", "SELECT id FROM orders WHERE tenant_id = 'acme'")
    assert parse_once(acme, own)
    assert acme.known_parse(own.encode()[5:]) is own


def test_known_parses_are_several_and_bounded() -> None:
    cache = AnalysisCache(POLICY)
    acme = inspector(cache)
    sql = "SELECT id FROM orders WHERE tenant_id = $1 AND id = {}"
    parses = [Parse("", sql.format(n)) for n in range(3 * MAX_KNOWN_PARSES)]
    for parse in parses[:7]:
        assert parse_once(acme, parse)
    for parse in parses[:7]:  # statements in turn (W3's seven): each one known
        assert acme.known_parse(parse.encode()[5:]) is parse
    for parse in parses:
        assert parse_once(acme, parse)
        assert 0 < len(acme._known_parses) <= MAX_KNOWN_PARSES
    assert acme.known_parse(parses[-1].encode()[5:]) is parses[-1]
    padding = "x" * MAX_KNOWN_PARSE_BYTES
    big = Parse("", f"SELECT id FROM orders WHERE tenant_id = $1 AND item <> '{padding}'")
    assert parse_once(acme, big)
    assert acme.known_parse(big.encode()[5:]) is None  # too big to hold: checked each time


def test_known_parse_is_per_session() -> None:
    """The cached analysis is shared; what a session remembers is not (globex's
    inspector refuses acme's constant though acme's remembers the same bytes)."""
    cache = AnalysisCache(POLICY)
    acme, globex = inspector(cache, "acme"), inspector(cache, "globex")
    parse = Parse("", "SELECT id FROM orders WHERE tenant_id = 'acme'")
    assert parse_once(acme, parse)
    assert acme.known_parse(parse.encode()[5:]) is parse
    assert globex.known_parse(parse.encode()[5:]) is None
    assert not parse_once(globex, parse)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["acme", "globex"]), TEXTS), max_size=20))
def test_known_parse_never_disagrees_with_inspect_parse(calls: list[tuple[str, str]]) -> None:
    cache = AnalysisCache(POLICY)
    sessions = {t: inspector(cache, t, timeout=1000) for t in ("acme", "globex")}
    fresh = {t: inspector(cache, t, timeout=1000) for t in ("acme", "globex")}
    for tenant, sql in calls:
        parse = Parse("", sql)
        # Whatever the fast path lets through, a session that never saw it allows too.
        expected = fresh[tenant].inspect_parse(parse) is None
        assert parse_once(sessions[tenant], parse) == expected


# --- known_bind: the in-place Bind check of the unnamed portal -------------------------

BIND_TEXTS = (
    "SELECT id FROM orders WHERE tenant_id = $1 AND id = $2",
    "SELECT id FROM orders WHERE id = $1 AND tenant_id = $2",
    "SELECT id FROM plans WHERE id = $1",
    "SELECT id FROM orders WHERE id = $1",  # refused (no tenant predicate)
)
_bind_values = st.sampled_from([b"acme", b"globex", b"7", b"", None])
_operations = st.one_of(
    st.tuples(st.just("parse"), st.sampled_from(["", "s1", "s2"]), st.sampled_from(BIND_TEXTS)),
    st.tuples(st.just("resolve"), st.sampled_from(["", "s1", "s2"]), st.booleans()),
    st.tuples(st.just("close"), st.sampled_from(["", "s1", "s2"]), st.booleans()),
    st.tuples(st.just("describe"), st.sampled_from(["", "s1", "s2"]), st.sampled_from([25, 23, 0])),
    st.tuples(st.just("query"), st.just(""), st.just(False)),
    st.tuples(
        st.just("bind"),
        st.sampled_from(["", "", "s1", "s2", "s3"]),
        st.tuples(
            st.sampled_from(["", "", "", "p"]),
            st.lists(_bind_values, max_size=3).map(tuple),
            st.sampled_from([(), (0,), (1,), (1, 0), (0, 1)]),
        ),
    ),
)


def _apply(inspect: PolicyInspector, operation: tuple[str, str, object]) -> None:
    """One operation other than a Bind, as the session drives the inspector."""
    what, name, arg = operation
    slot = inspect._statements.get(name)
    if what == "parse":
        inspect.inspect_parse(Parse(name, str(arg)))
    elif what == "resolve" and slot is not None and slot.pending:
        inspect.parse_resolved(slot.pending[0].parse, ok=bool(arg))
    elif what == "close":
        inspect.close_resolved(name, ok=bool(arg))
    elif what == "describe":
        inspect.statement_described(name, (int(str(arg)), 23))
    elif what == "query":
        inspect.query_sent()


@settings(max_examples=300, deadline=None)
@given(st.booleans(), st.lists(_operations, max_size=25))
def test_known_bind_never_disagrees_with_inspect_bind(
    dry_run: bool, operations: list[tuple[str, str, object]]
) -> None:
    """Two inspectors get the same calls, but one tries known_bind first (as the
    session's fast path does) and inspects only what it declines: each Bind it
    answers, inspect_bind allows, and both leave the same portal behind."""
    cache = AnalysisCache(POLICY)
    fast, general = (inspector(cache, dry_run=dry_run) for _ in range(2))
    for operation in operations:
        if operation[0] != "bind":
            _apply(fast, operation)
            _apply(general, operation)
            continue
        _, name, (portal, params, formats) = operation  # type: ignore[misc]
        bind = Bind(portal, name, formats, params)
        expected = general.inspect_bind(bind)
        known = fast.known_bind(bind.encode()[5:])
        if known is None:
            assert (fast.inspect_bind(bind) is None) == (expected is None)
        else:
            assert expected is None
            assert known == general.portal_info("")
        assert fast._portals == general._portals


def test_known_bind_answers_the_common_binds_and_sees_every_change() -> None:
    cache = AnalysisCache(POLICY)
    acme = inspector(cache)
    sql = BIND_TEXTS[0]

    def known(name: str, tenant: bytes = b"acme", portal: str = "") -> bool:
        bind = Bind(portal, name, (), (tenant, b"7"))
        return acme.known_bind(bind.encode()[5:]) is not None

    assert not known("s1")  # no such statement: the general path (the server refuses)
    parse = Parse("s1", sql)
    assert acme.inspect_parse(parse) is None
    assert not known("s1")  # not confirmed yet: every candidate must be checked
    acme.parse_resolved(parse, ok=True)
    assert known("s1")
    assert acme.portal_info("").sql == sql
    # Allowed once: the statement's next Binds are checked by their tenant bytes alone
    # (a lane), until anything in the registry changes.
    assert b"s1" in acme._bind_lanes
    acme._portals.clear()
    assert known("s1")
    assert acme.portal_info("").sql == sql  # the lane records the portal too
    assert not known("s1", b"acmf")
    acme.statement_described("s1", (25, 23))  # a change: the lane is stale
    binary = Bind("", "s1", (1,), (b"acme", b"7"))  # binary text: the full check only
    assert acme.known_bind(binary.encode()[5:]) is not None
    assert known("s1")
    assert acme._bind_lanes[b"s1"].version == acme._version
    acme.statement_described("s1", (23, 23))  # now the tenant parameter is an integer
    assert not known("s1")  # the lane is stale: the full check refuses "acme" as int4
    numeric = inspector(AnalysisCache(POLICY), "42")
    numeric.inspect_parse(parse)
    numeric.parse_resolved(parse, ok=True)
    numeric.statement_described("s1", (23, 23))
    assert numeric.known_bind(Bind("", "s1", (), (b"042", b"7")).encode()[5:]) is not None
    assert not numeric._bind_lanes  # an int4 is compared by value, never as bytes
    acme.statement_described("s1", (25, 23))  # back to a text tenant parameter
    assert not known("s1", b"globex")
    assert not known("s1", portal="p")  # named portals: the general path
    again = Parse("s1", BIND_TEXTS[1])  # the same name prepared again: two candidates
    assert acme.inspect_parse(again) is None
    assert not known("s1")
    acme.parse_resolved(again, ok=False)  # the server kept the first text
    assert known("s1")
    acme.close_resolved("s1", ok=True)
    assert not known("s1")
    unnamed = Parse("", sql)
    assert acme.inspect_parse(unnamed) is None
    assert known("")  # the unnamed statement's latest Parse, answered or not
    acme.parse_resolved(unnamed, ok=True)
    assert known("")
    acme.query_sent()  # a simple Query drops the unnamed statement
    assert not known("")
    assert acme.inspect_parse(Parse("", "SELECT id FROM orders WHERE id = $1")) is not None
    assert not known("")  # a refused Parse dropped it too
    reserved = Bind("", "__tenantgate_x", (), (b"acme",))
    assert acme.known_bind(reserved.encode()[5:]) is None
    dry = inspector(AnalysisCache(POLICY), dry_run=True)
    refused = Parse("", "SELECT id FROM orders WHERE id = $1")
    assert dry.inspect_parse(refused) is None  # forwarded: a would-be refusal
    assert dry.known_bind(Bind("", "", (), (b"7",)).encode()[5:]) is None  # counted each time


def test_a_reloads_inspector_inherits_the_prepared_statements_and_judges_them_again() -> None:
    """The server keeps a session's prepared statements across a policy reload.  A
    new inspector that did not know them would let any Bind of them through (an
    unknown name is left to the server, which would find it): so it inherits
    them, each judged again under its own policy."""
    old_cache = AnalysisCache(POLICY)
    old = inspector(old_cache)
    confirmed = Parse("s1", "SELECT id FROM orders WHERE tenant_id = $1 AND id = $2", ())
    pending = Parse("s2", "SELECT id FROM orders WHERE tenant_id = $1", ())
    shared = Parse("s3", "SELECT id FROM plans WHERE id = $1", ())
    for parse in (confirmed, shared):
        assert old.inspect_parse(parse) is None
        old.parse_resolved(parse, True)
    assert old.inspect_parse(pending) is None  # the server has not answered yet

    def bind(inspect: PolicyInspector, name: str, *params: bytes) -> bool:
        bound = Bind("", name, (), params, ())
        allowed = inspect.inspect_bind(bound) is None
        assert (inspect.known_bind(bound.encode()[5:]) is not None) <= allowed
        return allowed

    # The new policy no longer lists plans as shared: s3 is now an unknown table.
    stricter = AnalysisPolicy(scoped_tables={"orders": "tenant_id"})
    new = inspector(AnalysisCache(stricter))
    assert bind(new, "s1", b"globex", b"1")  # what an inspector that knows nothing does
    new = inspector(AnalysisCache(stricter))
    new.inherit(old)
    assert bind(new, "s1", b"acme", b"1")
    assert not bind(new, "s1", b"globex", b"1")  # checked as before the reload
    assert not bind(new, "s2", b"globex")  # a pending Parse is inherited too ...
    new.parse_resolved(pending, True)  # ... and the new inspector resolves it
    assert new._statements["s2"].confirmed is not None
    assert bind(new, "s2", b"acme")
    assert not bind(new, "s3", b"1")  # this policy refuses s3: every Bind of it
    error = new.inspect_bind(Bind("", "s3", (), (b"1",), ()))
    assert error is not None
    assert error.sqlstate == "42501"
    assert new.last_analysis is None  # judging again is not "the statement just inspected"
    # A dry run counts what it would refuse, and forwards it.
    dry = inspector(AnalysisCache(stricter), dry_run=True)
    dry.inherit(old)
    assert bind(dry, "s3", b"1")
    assert dry.portal_info("").would_reject
    assert dry.rejections == 1
