"""The session's fast paths send, forward and count exactly what its general path does.

``Session.client_data`` takes two shortcuts for the chunks drivers send most:
``_known_query`` (a whole Query) and ``_bound_execute`` ([Parse +] Bind
[+ Describe portal] + Execute + Sync of the unnamed portal).  Each claims to
do in one pass what ``_drain_client`` and ``_client_message`` do for the same
messages.  Here two sessions, wired as ``serve`` wires them (policy
inspector, analysis cache, telemetry, metrics) but with in-memory transports,
get the same client chunks: one through ``client_data``, the other straight
into the general path.  A small simulated server answers what each sent
upstream.  After every step both must have sent the same bytes upstream,
forwarded the same bytes to the client, and hold the same tracker state and
the same prepared statements and portals in their inspectors; at
the end both proxies' metrics must read the same.

No sockets and no database: the server's answers follow the protocol's rules
for the messages this vocabulary uses (an error skips the rest up to Sync).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantgate.app import ProxyApp
from tenantgate.enforcement import PolicyInspector
from tenantgate.protocol.backend import (
    CommandComplete,
    DataRow,
    ErrorResponse,
    FieldDescription,
    ParameterDescription,
    ReadyForQuery,
    RowDescription,
)
from tenantgate.protocol.framing import frame, scan_frames
from tenantgate.protocol.frontend import Bind, Close, Describe, Execute, Parse, Query, Sync
from tenantgate.session import Session

# The session wiring hotpath.py measures with (serve's wiring, without sockets).
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from hotpath import Recorder, wire

POLICY = """
listen: {host: 127.0.0.1, port: 0}
upstream: {host: 127.0.0.1, port: 1, database: app, user: app, password: x}
mode: MODE
dry_run: DRY_RUN
# ledger1 and ledger2: names that differ in a digit (one digit key, two text keys).
tables: {accounts: tenant_id, ledger1: tenant_id, ledger2: tenant_id}
tenants:
  acme: {users: {acme_app: {password: secret}}}
  globex: {users: {globex_app: {password: secret}}}
metrics: {enabled: false}
"""
SELECT = "SELECT balance FROM accounts WHERE tenant_id = {tenant} AND id = {key}"
PREPARED = "SELECT balance FROM accounts WHERE tenant_id = $1 AND id = $2"
# The same parameters the other way round: a Bind that fits PREPARED binds the key
# where the tenant must be (a re-prepared name must be checked against its new text).
SWAPPED = "SELECT balance FROM accounts WHERE id = $1 AND tenant_id = $2"
# Another text a Bind that fits PREPARED fits too: unnamed Parses that take turns.
TURN = "SELECT balance FROM accounts WHERE tenant_id = $1 AND id > $2"
UNPROVABLE = "SELECT balance FROM accounts WHERE id = 1"


@dataclass
class _Proxy:
    session: Session
    app: ProxyApp
    client: Recorder
    upstream: Recorder
    rate_limit: _RateLimit | None = None


class _RateLimit:
    """A rate limit that answers by count, so both sessions get the same answers if
    they ask as often: every ``refuse_every``-th statement is refused (None), the
    others run at once (0.0; 0 refuses none).  ``calls``: tokens asked for."""

    def __init__(self, refuse_every: int) -> None:
        self.refuse_every = refuse_every
        self.calls = 0

    def __call__(self, tenant: str) -> float | None:
        self.calls += 1
        if self.refuse_every and self.calls % self.refuse_every == 0:
            return None
        return 0.0


# (mode, dry_run): the fast paths differ per mode (rls/both splice the tenant in,
# a dry run forwards what it would refuse).
MODES = (("enforce", False), ("enforce", True), ("both", False), ("rls", False))
# (mode, dry_run, rate limit: None, or refuse every n-th statement, 0 for none).
CASES = (
    *((mode, dry_run, None) for mode, dry_run in MODES),
    ("enforce", False, 0),
    ("enforce", False, 3),
    ("both", False, 3),
)


def _proxy(
    mode: str = "enforce",
    dry_run: bool = False,
    refuse_every: int | None = None,
    policy: str = POLICY,
    tenant: str = "acme",
) -> _Proxy:
    """A session of ``tenant`` under ``policy`` (a template with MODE and DRY_RUN)."""
    policy = policy.replace("MODE", mode).replace("DRY_RUN", "true" if dry_run else "false")
    client, upstream = Recorder(), Recorder()
    session, app = wire(policy, client, upstream, tenant)
    proxy = _Proxy(session, app, client, upstream)
    if refuse_every is not None:
        proxy.rate_limit = session.rate_limit = _RateLimit(refuse_every)
        session.rate = 10.0
    return proxy


def _general(session: Session, data: bytes) -> None:
    """``client_data`` without its two shortcuts."""
    session.observer.traffic(len(data), 0)
    held = session._client_held
    if len(held):
        buffer = held.join(data)
        if buffer is not None:
            session._drain_client(buffer)
    else:
        session._drain_client(data)


class _Server:
    """Answers the messages a session sent upstream, as PostgreSQL would, transaction
    blocks included: BEGIN opens one (status T), an error in it aborts it (status E:
    everything but COMMIT/ROLLBACK fails until then), COMMIT/ROLLBACK end it."""

    def __init__(self) -> None:
        self.statements: dict[str, tuple[int, ...]] = {}  # name -> parameter types
        self.texts: dict[str, str] = {}  # name -> its text
        self.skipping = False
        self.status = "I"
        self.portal_keys: dict[str, bytes] = {}  # portal -> the key bound to it
        self.portal_texts: dict[str, str] = {}  # portal -> its statement's text

    def answer(self, sent: bytes) -> bytes:
        frames, consumed = scan_frames(sent, 1 << 20)
        assert consumed == len(sent), "the session sent an incomplete message upstream"
        return b"".join(self._one(t, sent[start:end]) for t, start, end in frames)

    def _error(self, sqlstate: str) -> bytes:
        if self.status == "T":
            self.status = "E"
        fields = (("S", "ERROR"), ("V", "ERROR"), ("C", sqlstate), ("M", "failed"))
        return ErrorResponse(fields).encode()

    def _fail(self, sqlstate: str) -> bytes:
        """An extended-protocol error: the rest up to Sync is discarded."""
        self.skipping = True
        return self._error(sqlstate)

    def _rows(self, key: bytes) -> bytes:
        """A statement's result for the row of ``key``: key 2 also raises a notice
        (forwarded as it comes), key 3 fails at run time (division by zero)."""
        if key == b"3":
            return self._error("22012")
        rows = DataRow((b"10",)).encode() + CommandComplete("SELECT 1").encode()
        if key == b"2":
            return _notice() + rows
        return rows

    def _control(self, text: str) -> bytes | None:
        """Run ``text`` if it is transaction control: its answer, else None."""
        word = text.strip().upper()
        if word == "BEGIN":
            if self.status != "I":
                return _notice() + CommandComplete("BEGIN").encode()
            self.status = "T"
            return CommandComplete("BEGIN").encode()
        if word in ("COMMIT", "ROLLBACK"):
            tag = "ROLLBACK" if self.status == "E" else word
            out = _notice() if self.status == "I" else b""
            self.status = "I"
            return out + CommandComplete(tag).encode()
        return None

    def _one(self, msg_type: int, payload: bytes) -> bytes:
        if msg_type == 0x53:  # Sync
            self.skipping = False
            return ReadyForQuery(self.status).encode()
        if self.skipping:  # after an error, everything up to Sync is discarded
            return b""
        if msg_type == 0x51:  # Query: one result per statement (rls/both prefix set_config)
            self.statements.pop("", None)  # a simple Query drops the unnamed statement
            text = Query.decode(payload).query
            if "rejected by policy" in text:
                return self._error("42601") + ReadyForQuery(self.status).encode()
            out = b""
            for statement in (s.strip() for s in text.split(";") if s.strip()):
                control = self._control(statement)
                if control is not None:
                    out += control
                    continue
                if self.status == "E":
                    return out + self._error("25P02") + ReadyForQuery("E").encode()
                if statement.upper().startswith("DEALLOCATE"):
                    name = statement.split()[-1]
                    if name.upper() == "ALL":
                        self.statements.clear()
                    elif self.statements.pop(name, None) is None:
                        return out + self._error("26000") + ReadyForQuery(self.status).encode()
                    out += CommandComplete("DEALLOCATE").encode()
                else:
                    key = statement.rsplit("id = ", 1)[-1].encode() if "id = " in statement else b""
                    result = self._rows(key)
                    out += result if key == b"3" else _row_description() + result
                    if key == b"3":  # the rest of the string is skipped
                        return out + ReadyForQuery(self.status).encode()
            return out + ReadyForQuery(self.status).encode()
        if msg_type == 0x50:  # Parse
            parse = Parse.decode(payload)
            if "rejected by policy" in parse.query:
                return self._fail("42601")
            if self.status == "E" and self._control(parse.query) is None:
                return self._fail("25P02")
            if parse.name and parse.name in self.statements:
                return self._fail("42P05")  # prepared statement already exists
            swapped = "id = $1" in parse.query
            self.statements[parse.name] = (23, 25) if swapped else (25, 23)
            self.texts[parse.name] = parse.query
            return frame(b"1")
        if msg_type == 0x42:  # Bind
            bind = Bind.decode(payload)
            if bind.statement not in self.statements:
                return self._fail("26000")
            text = self.texts.get(bind.statement, "")
            if self.status == "E" and text.upper() not in ("COMMIT", "ROLLBACK"):
                return self._fail("25P02")
            key = bind.params[1] if len(bind.params) > 1 else None
            self.portal_keys[bind.portal] = key or b""
            self.portal_texts[bind.portal] = text
            return frame(b"2")
        if msg_type == 0x44:  # Describe
            describe = Describe.decode(payload)
            if describe.kind == "S":
                types = self.statements.get(describe.name)
                if types is None:
                    return self._fail("26000")
                return ParameterDescription(types).encode() + _row_description()
            if self.portal_texts.get(describe.name, "").upper() in (*_CONTROL, "DEALLOCATE ALL"):
                return frame(b"n")  # NoData
            return _row_description()
        if msg_type == 0x45:  # Execute
            portal = Execute.decode(payload).portal
            text = self.portal_texts.get(portal, "")
            control = self._control(text)
            if control is not None:
                return control
            if self.status == "E":
                return self._fail("25P02")
            if text.upper() == "DEALLOCATE ALL":
                self.statements.clear()
                return CommandComplete("DEALLOCATE ALL").encode()
            key = self.portal_keys.get(portal, b"")
            self.skipping = key == b"3"
            return self._rows(key)
        if msg_type == 0x43:  # Close: a statement (gone, if it was there) or a portal
            close = Close.decode(payload)
            if close.kind == "S":
                self.statements.pop(close.name, None)
            return frame(b"3")
        raise AssertionError(f"unexpected message {chr(msg_type)!r} upstream")


_CONTROL = ("BEGIN", "COMMIT", "ROLLBACK")


def _notice() -> bytes:
    notice = (("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000"), ("M", "note"))
    return ErrorResponse(notice, notice=True).encode()


def _row_description() -> bytes:
    return RowDescription((FieldDescription("balance", 0, 0, 23, 4, -1, 0),)).encode()


# How a Bind carries its parameters: the tenant (first parameter) in text or binary
# format, the parameters with one format code for all, or a parameter missing or NULL.
BIND_FORMS = ("text", "text", "text", "binary", "one code", "no tenant", "null tenant")


def _bound(
    statement: str,
    tenant: str,
    key: int,
    describe: bool,
    parse: bool,
    form: str = "text",
    sql: str = PREPARED,
) -> bytes:
    out = Parse("", sql, ()).encode() if parse else b""
    params: tuple[bytes | None, ...] = (tenant.encode(), str(key).encode())
    formats: tuple[int, ...] = (0,)
    if form == "binary":
        formats = (1, 0)  # the tenant's UTF-8 bytes: binary text, if the type is known
    elif form == "one code":
        formats = (0, 0)
    elif form == "no tenant":
        params = params[:1]
    elif form == "null tenant":
        params = (None, params[1])
    out += Bind("", statement, formats, params, (0,)).encode()
    if describe:
        out += Describe("P", "").encode()
    return out + Execute("", 0).encode() + Sync().encode()


def _control_bound(statement: str, describe: bool, text: str | None = None) -> bytes:
    """Bind [+ Describe] + Execute + Sync of a statement without parameters (``text``:
    with the unnamed statement's Parse of it in front)."""
    out = b"" if text is None else Parse("", text, ()).encode()
    out += Bind("", statement, (), (), ()).encode()
    if describe:
        out += Describe("P", "").encode()
    return out + Execute("", 0).encode() + Sync().encode()


tenants = st.sampled_from(["acme", "acme", "acme", "globex"])
keys = st.integers(1, 3)
operations: st.SearchStrategy[bytes] = st.one_of(
    st.builds(lambda t, k: Query(SELECT.format(tenant=f"'{t}'", key=k)).encode(), tenants, keys),
    st.just(Query(UNPROVABLE).encode()),
    st.builds(
        lambda name, t, k, d, form: _bound(name, t, k, d, parse=False, form=form),
        st.sampled_from(["s1", "s1", "s2", "", "__tenantgate_s"]),
        tenants,
        keys,
        st.booleans(),
        st.sampled_from(BIND_FORMS),
    ),
    st.builds(
        lambda t, k, d, form, sql: _bound("", t, k, d, parse=True, form=form, sql=sql),
        tenants,
        keys,
        st.booleans(),
        st.sampled_from(BIND_FORMS),
        # SWAPPED is the same length with the tenant elsewhere: after the first, a
        # Bind right for one is wrong for the other.  TURN takes turns with PREPARED.
        st.sampled_from([PREPARED, PREPARED, TURN, SWAPPED]),
    ),
    # A Parse with no Sync: what follows it up to a Sync is skipped if it fails.
    st.builds(
        lambda name, sql: Parse(name, sql, ()).encode(),
        st.sampled_from(["s1", "s2", ""]),
        st.sampled_from([PREPARED, SWAPPED]),
    ),
    st.builds(
        lambda name, sql: (
            Parse(name, sql, ()).encode() + Describe("S", name).encode() + Sync().encode()
        ),
        st.sampled_from(["s1", "s1", "s2"]),
        st.sampled_from([PREPARED, PREPARED, SWAPPED]),
    ),
    # What changes a prepared statement under the session: Close, DEALLOCATE, and
    # both at once with a new text for the name (a driver re-preparing it).
    st.builds(
        lambda name: Close("S", name).encode() + Sync().encode(), st.sampled_from(["s1", "s2"])
    ),
    st.builds(
        lambda name, sql: (
            Close("S", name).encode() + Parse(name, sql, ()).encode() + Sync().encode()
        ),
        st.sampled_from(["s1", "s2"]),
        st.sampled_from([PREPARED, SWAPPED]),
    ),
    st.builds(
        lambda name: Query(f"DEALLOCATE {name}").encode(), st.sampled_from(["s1", "s2", "ALL"])
    ),
    # Transaction blocks, by simple Query and by prepared (or unnamed) statements.
    st.builds(lambda word: Query(word).encode(), st.sampled_from(_CONTROL)),
    st.builds(
        lambda name, word: Parse(name, word, ()).encode() + Sync().encode(),
        st.sampled_from(["b", "c"]),
        st.sampled_from(["BEGIN", "COMMIT", "BEGIN", "COMMIT", "ROLLBACK"]),
    ),
    st.builds(_control_bound, st.sampled_from(["b", "c"]), st.booleans()),
    st.builds(
        lambda word, describe: _control_bound("", describe, word),
        st.sampled_from(_CONTROL),
        st.booleans(),
    ),
)


@st.composite
def steps(draw: Callable[..., object]) -> list[tuple[list[bytes], int | None]]:
    """Each step: the client's chunks (one operation, two pipelined in one chunk or
    sent one after the other before any answer, or one split in two) and where to
    split the server's answer (None: one chunk)."""
    out: list[tuple[list[bytes], int | None]] = []
    # Often inside a transaction block, where rls/both inject once per block.
    in_block: bool = draw(st.booleans())  # type: ignore[operator]
    for number in range(draw(st.integers(1, 12))):  # type: ignore[operator]
        first: bytes = draw(operations)  # type: ignore[operator]
        if number == 0 and in_block:
            first = Query("BEGIN").encode()
        shape = draw(st.sampled_from(["one", "one", "pipelined", "two", "split"]))  # type: ignore[operator]
        if shape == "pipelined":
            chunks = [first + draw(operations)]  # type: ignore[operator]
        elif shape == "two":
            chunks = [first, draw(operations)]  # type: ignore[operator]
        elif shape == "split":
            cut: int = draw(st.integers(1, len(first) - 1))  # type: ignore[operator]
            chunks = [first[:cut], first[cut:]]
        else:
            chunks = [first]
        split: int | None = draw(st.one_of(st.none(), st.integers(1, 40)))  # type: ignore[operator]
        out.append((chunks, split))
    return out


def _registry(session: Session) -> dict[str, object]:
    """The inspector's prepared statements (confirmed, pending) and portals."""
    inspector = cast(PolicyInspector, session.inspector)
    statements = {
        name: (
            None if slot.confirmed is None else slot.confirmed.parse,
            [prepared.parse for prepared in slot.pending],
        )
        for name, slot in inspector._statements.items()
    }
    injector = session.injector
    return {
        "statements": statements,
        "portals": dict(inspector._portals),
        "injector": None
        if injector is None
        else (
            injector.tenant_in_block,
            injector._needs_injection,
            injector.prepared,
            injector.statement_name,
        ),
    }


def _metrics(app: ProxyApp) -> list[str]:
    """The proxy's metric samples, less what depends on the clock (creation times,
    how long statements took: the count of timed statements stays)."""
    text = app.metrics.render().decode()
    timing = ("_created", "tenantgate_statement_duration_seconds_sum", "duration_seconds_bucket")
    return sorted(
        line
        for line in text.splitlines()
        if line.startswith("tenantgate_") and not any(part in line for part in timing)
    )


async def _run(
    script: list[tuple[list[bytes], int | None]],
    mode: str,
    dry_run: bool,
    refuse_every: int | None,
) -> None:
    fast = _proxy(mode, dry_run, refuse_every)
    fast.session.start_lane()  # enforce mode on the compiled build: the C lane too
    general = _proxy(mode, dry_run, refuse_every)
    server = _Server()  # both proxies must send it the same bytes, so one server answers
    for number, (chunks, split) in enumerate(script):
        for chunk in chunks:
            fast.session.client_data(chunk)
            _general(general.session, chunk)
            lane = fast.session._lane
            if lane is not None:  # the session's mirror of the lane's state
                assert fast.session._lane_busy == lane.outstanding
        sent = fast.upstream.take()
        assert sent == general.upstream.take(), f"step {number}: different bytes upstream"
        answer = server.answer(sent)
        cut = len(answer) if split is None else min(split, len(answer))
        for piece in (answer[:cut], answer[cut:]):
            if piece:
                fast.session.upstream_data(piece)
                general.session.upstream_data(piece)
        assert fast.client.take() == general.client.take(), f"step {number}: different answers"
        for proxy in (fast, general):
            assert not proxy.session._finished.done(), proxy.session._finished.result()
        assert fast.session.tracker.status == general.session.tracker.status
        assert fast.session.tracker.outstanding == general.session.tracker.outstanding
        assert _registry(fast.session) == _registry(general.session), f"step {number}"
    assert _metrics(fast.app) == _metrics(general.app)
    if fast.rate_limit is not None and general.rate_limit is not None:
        assert fast.rate_limit.calls == general.rate_limit.calls  # one token per statement


@pytest.mark.parametrize(("mode", "dry_run", "refuse_every"), CASES)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=steps())
def test_fast_paths_match_the_general_path(
    mode: str, dry_run: bool, refuse_every: int | None, script: list[tuple[list[bytes], int | None]]
) -> None:
    asyncio.run(_run(script, mode, dry_run, refuse_every))


@pytest.mark.parametrize(("mode", "dry_run"), MODES)
def test_the_fast_paths_are_taken(mode: str, dry_run: bool) -> None:
    """The comparison above means something only if the shortcuts run: the
    vocabulary's repeated Query, Bind/Execute/Sync of a prepared statement and
    unnamed Parse/Bind/Execute/Sync are each taken by a fast path (which returns
    False, handling nothing, when a chunk is not its case), and in enforce mode
    the request is held as one tracker entry (expect_bound)."""

    async def run() -> None:
        proxy = _proxy(mode, dry_run)
        server = _Server()
        session = proxy.session

        def answer() -> None:
            session.upstream_data(server.answer(proxy.upstream.take()))
            assert proxy.client.take().endswith(ReadyForQuery("I").encode())

        session.client_data(Parse("s1", PREPARED, ()).encode() + Sync().encode())
        answer()
        query = Query(SELECT.format(tenant="'acme'", key=1)).encode()
        session.client_data(query)  # the first time teaches the inspector this text
        answer()
        assert session._known_query(query)
        answer()
        for chunk in (
            _bound("s1", "acme", 1, describe=False, parse=False),
            _bound("s1", "acme", 2, describe=True, parse=False),
            _bound("", "acme", 3, describe=True, parse=True),
        ):
            assert session._bound_execute(chunk)
            if session.injector is None:  # enforce: the Bind checked in place, one entry
                assert session.tracker.outstanding > len(session.tracker._pending)
            answer()
        assert not session._bound_execute(query)
        assert session.tracker.idle

    asyncio.run(run())


# Transaction blocks, where rls/both set the tenant once per block and the fast
# paths (and the lane) take the statements after that: a focused vocabulary, so
# that scripts stay inside a block for several statements.
_BLOCK_SETUP = [
    Parse("s1", PREPARED, ()).encode() + Sync().encode(),
    Parse("b", "BEGIN", ()).encode() + Sync().encode(),
    Parse("c", "COMMIT", ()).encode() + Sync().encode(),
    Parse("d", "DEALLOCATE ALL", ()).encode() + Sync().encode(),
]
_BLOCK_VOCABULARY = [
    Query("BEGIN").encode(),
    Query("COMMIT").encode(),
    Query("ROLLBACK").encode(),
    _control_bound("b", describe=False),
    _control_bound("c", describe=True),
    _control_bound("", describe=True, text="BEGIN"),
    _control_bound("d", describe=False),
    _bound("s1", "acme", 1, describe=False, parse=False),
    _bound("s1", "acme", 1, describe=False, parse=False),
    _bound("s1", "acme", 2, describe=True, parse=False),
    _bound("s1", "acme", 3, describe=False, parse=False),  # fails: aborts the block
    _bound("s1", "globex", 1, describe=False, parse=False),  # refused
    _bound("", "acme", 1, describe=True, parse=True),
    _bound("", "acme", 1, describe=True, parse=True),
    Query(SELECT.format(tenant="'acme'", key=1)).encode(),
    Query("DEALLOCATE ALL").encode(),
    # An Execute whose Sync comes later: the block may get the tenant without one.
    _bound("s1", "acme", 1, describe=False, parse=False)[: -len(Sync().encode())],
    Sync().encode(),
]


@pytest.mark.parametrize("mode", ["enforce", "both", "rls"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    script=st.lists(
        st.tuples(
            st.sampled_from(_BLOCK_VOCABULARY).map(lambda chunk: [chunk]),
            st.one_of(st.none(), st.none(), st.integers(1, 40)),
        ),
        min_size=1,
        max_size=14,
    )
)
def test_fast_paths_match_the_general_path_in_transaction_blocks(
    mode: str, script: list[tuple[list[bytes], int | None]]
) -> None:
    setup: list[tuple[list[bytes], int | None]] = [([chunk], None) for chunk in _BLOCK_SETUP]
    asyncio.run(_run([*setup, ([Query("BEGIN").encode()], None), *script], mode, False, None))


@pytest.mark.parametrize("mode", ["both", "rls"])
def test_in_a_block_with_the_tenant_a_bound_request_is_one_entry(mode: str) -> None:
    """rls/both: the block's first statement gets the tenant (the injector's Bind +
    Execute + Close before it, their answers hidden); the ones after it need
    nothing and are held as one tracker entry, as in enforce mode."""

    async def run() -> None:
        proxy = _proxy(mode)
        server = _Server()
        session = proxy.session

        def exchange(chunk: bytes) -> bytes:
            session.client_data(chunk)
            sent = proxy.upstream.take()
            session.upstream_data(server.answer(sent))
            return sent

        for chunk in _BLOCK_SETUP:
            exchange(chunk)
        exchange(Query("BEGIN").encode())
        bind = _bound("s1", "acme", 1, describe=False, parse=False)
        assert b"__tenantgate" in exchange(bind)  # the block's first statement
        session.client_data(bind)
        assert session.tracker.outstanding > len(session.tracker._pending) == 1
        assert proxy.upstream.take() == bind  # as received
        session.upstream_data(server.answer(bind))
        assert proxy.client.take().endswith(ReadyForQuery("T").encode())
        assert exchange(_control_bound("c", describe=False)) == _control_bound("c", False)
        assert b"__tenantgate" in exchange(bind)  # a new transaction: the tenant again

    asyncio.run(run())
