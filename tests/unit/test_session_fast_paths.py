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
from hotpath import Sink, wire

POLICY = """
listen: {host: 127.0.0.1, port: 0}
upstream: {host: 127.0.0.1, port: 1, database: app, user: app, password: x}
mode: MODE
dry_run: DRY_RUN
tables: {accounts: tenant_id}
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
UNPROVABLE = "SELECT balance FROM accounts WHERE id = 1"


class _Transport(Sink):
    """Collects what the session writes."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


@dataclass
class _Proxy:
    session: Session
    app: ProxyApp
    client: _Transport
    upstream: _Transport
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


def _proxy(mode: str = "enforce", dry_run: bool = False, refuse_every: int | None = None) -> _Proxy:
    policy = POLICY.replace("MODE", mode).replace("DRY_RUN", "true" if dry_run else "false")
    client, upstream = _Transport(), _Transport()
    session, app = wire(policy, client, upstream)
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
    """Answers the messages a session sent upstream, as PostgreSQL would."""

    def __init__(self) -> None:
        self.statements: dict[str, tuple[int, ...]] = {}  # name -> parameter types
        self.skipping = False
        self.portal_keys: dict[str, bytes] = {}  # portal -> the key bound to it

    def answer(self, sent: bytes) -> bytes:
        frames, consumed = scan_frames(sent, 1 << 20)
        assert consumed == len(sent), "the session sent an incomplete message upstream"
        return b"".join(self._one(t, sent[start:end]) for t, start, end in frames)

    def _error(self, sqlstate: str) -> bytes:
        fields = (("S", "ERROR"), ("V", "ERROR"), ("C", sqlstate), ("M", "failed"))
        return ErrorResponse(fields).encode()

    def _rows(self, key: bytes) -> bytes:
        """A statement's result for the row of ``key``: key 2 also raises a notice
        (forwarded as it comes), key 3 fails at run time (division by zero)."""
        if key == b"3":
            return self._error("22012")
        rows = DataRow((b"10",)).encode() + CommandComplete("SELECT 1").encode()
        if key == b"2":
            notice = (("S", "NOTICE"), ("V", "NOTICE"), ("C", "00000"), ("M", "note"))
            return ErrorResponse(notice, notice=True).encode() + rows
        return rows

    def _one(self, msg_type: int, payload: bytes) -> bytes:
        if msg_type == 0x53:  # Sync
            self.skipping = False
            return ReadyForQuery("I").encode()
        if self.skipping:  # after an error, everything up to Sync is discarded
            return b""
        if msg_type == 0x51:  # Query: one result per statement (rls/both prefix set_config)
            self.statements.pop("", None)  # a simple Query drops the unnamed statement
            text = Query.decode(payload).query
            if "rejected by policy" in text:
                return self._error("42601") + ReadyForQuery("I").encode()
            out = b""
            for statement in (s.strip() for s in text.split(";") if s.strip()):
                if statement.upper().startswith("DEALLOCATE"):
                    name = statement.split()[-1]
                    if name.upper() == "ALL":
                        self.statements.clear()
                    elif self.statements.pop(name, None) is None:
                        return out + self._error("26000") + ReadyForQuery("I").encode()
                    out += CommandComplete("DEALLOCATE").encode()
                else:
                    key = statement.rsplit("id = ", 1)[-1].encode() if "id = " in statement else b""
                    result = self._rows(key)
                    out += result if key == b"3" else _row_description() + result
                    if key == b"3":  # the rest of the string is skipped
                        return out + ReadyForQuery("I").encode()
            return out + ReadyForQuery("I").encode()
        if msg_type == 0x50:  # Parse
            parse = Parse.decode(payload)
            if "rejected by policy" in parse.query:
                self.skipping = True
                return self._error("42601")
            if parse.name and parse.name in self.statements:
                self.skipping = True
                return self._error("42P05")  # prepared statement already exists
            swapped = "id = $1" in parse.query
            self.statements[parse.name] = (23, 25) if swapped else (25, 23)
            return frame(b"1")
        if msg_type == 0x42:  # Bind
            bind = Bind.decode(payload)
            if bind.statement not in self.statements:
                self.skipping = True
                return self._error("26000")
            key = bind.params[1] if len(bind.params) > 1 else None
            self.portal_keys[bind.portal] = key or b""
            return frame(b"2")
        if msg_type == 0x44:  # Describe
            describe = Describe.decode(payload)
            if describe.kind == "S":
                types = self.statements.get(describe.name)
                if types is None:
                    self.skipping = True
                    return self._error("26000")
                return ParameterDescription(types).encode() + _row_description()
            return _row_description()
        if msg_type == 0x45:  # Execute
            key = self.portal_keys.get(Execute.decode(payload).portal, b"")
            self.skipping = key == b"3"
            return self._rows(key)
        if msg_type == 0x43:  # Close: a statement (gone, if it was there) or a portal
            close = Close.decode(payload)
            if close.kind == "S":
                self.statements.pop(close.name, None)
            return frame(b"3")
        raise AssertionError(f"unexpected message {chr(msg_type)!r} upstream")


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
        # The other text is the same length with the tenant elsewhere: after the
        # first, a Bind right for one is wrong for the other.
        st.sampled_from([PREPARED, PREPARED, PREPARED, SWAPPED]),
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
)


@st.composite
def steps(draw: Callable[..., object]) -> list[tuple[list[bytes], int | None]]:
    """Each step: the client's chunks (one operation, two pipelined in one chunk or
    sent one after the other before any answer, or one split in two) and where to
    split the server's answer (None: one chunk)."""
    out: list[tuple[list[bytes], int | None]] = []
    for _ in range(draw(st.integers(1, 12))):  # type: ignore[operator]
        first: bytes = draw(operations)  # type: ignore[operator]
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
    return {"statements": statements, "portals": dict(inspector._portals)}


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
