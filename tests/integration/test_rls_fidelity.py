"""rls mode is invisible on the wire: a client gets the same messages as from Postgres.

The proxy adds ``set_config`` to every transaction and must drop exactly the
responses to what it added.  Each scenario below (driver operations of psycopg
and asyncpg, and raw protocol sequences drivers cannot produce) runs twice
through a recording TCP relay written here:

* **proxy side**: client -> relay -> tenantgate (rls mode) as ``acme_app``;
* **direct side**: client -> relay -> PostgreSQL as ``app_tenant`` (the proxy's
  own upstream role) with ``options=-c app.tenant_id=acme``.

Why that direct reference is sound: it is the same server, database, role and
RLS policies, and the tenant is set once at *session* level by the startup
packet, so every statement sees exactly acme's rows without any extra
statement on the wire.  The two recordings can then differ only by what the
proxy adds or fails to remove.  Identical data is read (no writes that leave
traces such as sequence values), so DataRows compare byte for byte.

What is compared: every backend message after the first ReadyForQuery (login and
authentication differ by construction: SCRAM against different verifiers,
BackendKeyData with proxy-generated keys, ParameterStatus values of a different
server_version/application name...).  ParameterStatus messages are compared by
name only; BackendKeyData is dropped.  Nothing else is normalized: error fields
(including positions), notices, tags, RowDescriptions and ReadyForQuery status
must match exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
import pytest
from proxy_helpers import stop_when_idle
from scramp import ScramClient

from support.db import TenantDb
from support.proxy import RunningProxy
from tenantgate.cluster import Cluster

pytestmark = pytest.mark.postgres

Message = tuple[str, bytes]
TENANT = "acme"


# --- the recording relay ---------------------------------------------------------------


@dataclass
class Recording:
    received: bytearray = field(default_factory=bytearray)
    done: asyncio.Event = field(default_factory=asyncio.Event)


class Relay:
    """Forwards TCP connections to ``target``; records what the server sends back."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.recordings: list[Recording] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Relay:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        recording = Recording()
        self.recordings.append(recording)
        try:
            ureader, uwriter = await asyncio.open_connection(*self.target)
        except OSError:
            cwriter.close()
            recording.done.set()
            return
        await asyncio.gather(
            self._pipe(creader, uwriter, None), self._pipe(ureader, cwriter, recording.received)
        )
        recording.done.set()

    @staticmethod
    async def _pipe(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sink: bytearray | None
    ) -> None:
        try:
            while data := await reader.read(65536):
                if sink is not None:
                    sink += data
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def last(self) -> list[Message]:
        """The messages of the last connection after its first ReadyForQuery (normalized)."""
        recording = self.recordings[-1]
        await asyncio.wait_for(recording.done.wait(), 10)
        return after_login(split_messages(bytes(recording.received)))


def split_messages(data: bytes) -> list[Message]:
    out: list[Message] = []
    pos = 0
    while pos + 5 <= len(data):
        kind = chr(data[pos])
        (length,) = struct.unpack_from("!I", data, pos + 1)
        out.append((kind, data[pos + 5 : pos + 1 + length]))
        pos += 1 + length
    assert pos == len(data), "recording ends in the middle of a message"
    return out


def after_login(messages: list[Message]) -> list[Message]:
    kinds = [kind for kind, _ in messages]
    assert "Z" in kinds, f"no ReadyForQuery in {kinds}"
    out: list[Message] = []
    for kind, payload in messages[kinds.index("Z") + 1 :]:
        if kind == "K":
            continue
        out.append((kind, payload.split(b"\x00", 1)[0] if kind == "S" else payload))
    return out


# --- the two sides ------------------------------------------------------------------------


@dataclass
class Side:
    """How to reach one side through a relay: credentials and startup options."""

    name: str
    host: str
    port: int
    user: str
    password: str
    options: str | None  # startup `options` (direct side: the session-level tenant)
    relay: Relay | None = None

    @property
    def relay_port(self) -> int:
        assert self.relay is not None
        return self.relay.port

    def conninfo(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.relay_port,
            "dbname": "app",
            "user": self.user,
            "password": self.password,
            "sslmode": "disable",
            "gssencmode": "disable",
        }
        if self.options:
            info["options"] = self.options
        return info

    async def psycopg(
        self, autocommit: bool = True, prepare_threshold: int | None = None
    ) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            autocommit=autocommit, prepare_threshold=prepare_threshold, **self.conninfo()
        )

    async def asyncpg(self) -> asyncpg.Connection:
        settings = {"options": self.options} if self.options else {}
        return await asyncpg.connect(
            host="127.0.0.1",
            port=self.relay_port,
            user=self.user,
            password=self.password,
            database="app",
            ssl=False,
            server_settings=settings,
        )

    async def raw(self) -> RawConnection:
        params = {"user": self.user, "database": "app", "client_encoding": "UTF8"}
        if self.options:
            params["options"] = self.options
        conn = RawConnection()
        await conn.open(self.relay_port, params, self.user, self.password)
        return conn


@pytest.fixture(scope="module")
def proxy(tenant_db: TenantDb) -> Iterator[RunningProxy]:
    running = RunningProxy(tenant_db.policy("rls"))
    try:
        yield running
    finally:
        stop_when_idle(running)


@pytest.fixture
async def sides(proxy: RunningProxy, tenant_db: TenantDb) -> AsyncIterator[tuple[Side, Side]]:
    user = tenant_db.user(TENANT)
    via_proxy = Side("proxy", proxy.host, proxy.port, user.name, user.password, None)
    direct = Side(
        "direct",
        tenant_db.host,
        tenant_db.port,
        tenant_db.app_user,
        tenant_db.app_password,
        f"-c app.tenant_id={TENANT}",
    )
    async with Relay(via_proxy.host, via_proxy.port) as r1, Relay(direct.host, direct.port) as r2:
        via_proxy.relay, direct.relay = r1, r2
        yield via_proxy, direct


# --- a raw protocol client (for sequences drivers do not send) ----------------------------


def _msg(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def _cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def parse(sql: str, name: str = "") -> bytes:
    return _msg(b"P", _cstr(name) + _cstr(sql) + struct.pack("!H", 0))


def bind(params: tuple[str, ...] = (), statement: str = "", portal: str = "") -> bytes:
    body = _cstr(portal) + _cstr(statement) + struct.pack("!HH", 0, len(params))
    for value in params:
        body += struct.pack("!i", len(value.encode())) + value.encode()
    return _msg(b"B", body + struct.pack("!H", 0))


def describe(kind: str, name: str = "") -> bytes:
    return _msg(b"D", kind.encode() + _cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return _msg(b"E", _cstr(portal) + struct.pack("!I", max_rows))


def close(kind: str, name: str = "") -> bytes:
    return _msg(b"C", kind.encode() + _cstr(name))


def query(sql: str) -> bytes:
    return _msg(b"Q", _cstr(sql))


SYNC = _msg(b"S")
FLUSH = _msg(b"H")


def run_query(sql: str, *params: str) -> bytes:
    """Parse + Bind + Describe + Execute of the unnamed statement (no Sync)."""
    return parse(sql) + bind(params) + describe("P") + execute()


class RawConnection:
    """Just enough of a client: SCRAM/cleartext login, send bytes, read to ReadyForQuery."""

    def __init__(self) -> None:
        self.reader: asyncio.StreamReader
        self.writer: asyncio.StreamWriter

    async def open(self, port: int, params: dict[str, str], user: str, password: str) -> None:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        body = struct.pack("!I", 3 << 16) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items())
        body += b"\x00"
        self.writer.write(struct.pack("!I", len(body) + 4) + body)
        scram: ScramClient | None = None
        while True:
            kind, payload = await self.read()
            if kind == "E":
                raise AssertionError(f"login failed: {payload!r}")
            if kind == "R":
                (code,) = struct.unpack_from("!i", payload)
                if code == 10:
                    scram = ScramClient(["SCRAM-SHA-256"], user, password)
                    first = scram.get_client_first().encode()
                    self.send(
                        _msg(b"p", _cstr("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first)
                    )
                elif code == 11:
                    assert scram is not None
                    scram.set_server_first(payload[4:].decode())
                    self.send(_msg(b"p", scram.get_client_final().encode()))
                elif code == 12:
                    assert scram is not None
                    scram.set_server_final(payload[4:].decode())
                elif code == 3:
                    self.send(_msg(b"p", _cstr(password)))
                else:
                    assert code == 0, code
            elif kind == "Z":
                return

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def read(self) -> Message:
        header = await asyncio.wait_for(self.reader.readexactly(5), 10)
        (length,) = struct.unpack_from("!I", header, 1)
        payload = await asyncio.wait_for(self.reader.readexactly(length - 4), 10)
        return chr(header[0]), payload

    async def until(self, kind: str, count: int = 1) -> list[Message]:
        """Read until ``count`` messages of ``kind`` arrived."""
        out: list[Message] = []
        while count:
            message = await self.read()
            out.append(message)
            if message[0] == kind:
                count -= 1
        return out

    async def exchange(self, data: bytes, ready: int = 1) -> list[Message]:
        self.send(data)
        await self.writer.drain()
        return await self.until("Z", ready)

    async def close(self) -> None:
        self.send(_msg(b"X"))
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


# --- scenarios ------------------------------------------------------------------------------

Scenario = Callable[[Side], Awaitable[None]]
ORDERS = "SELECT * FROM orders ORDER BY id"


async def psycopg_simple(side: Side) -> None:
    async with await side.psycopg() as conn:
        await (await conn.execute(ORDERS)).fetchall()
        await (await conn.execute("SELECT tenant_id, name FROM customers ORDER BY id")).fetchall()
        await conn.execute("ROLLBACK")  # WARNING 25P01 as a NoticeResponse
        await (await conn.execute("SELECT current_setting('app.tenant_id', true)")).fetchall()


async def psycopg_multi_statement(side: Side) -> None:
    async with await side.psycopg() as conn:
        await conn.execute(
            f"BEGIN; {ORDERS}; COMMIT; SELECT count(*) FROM customers;"
            " SELECT current_setting('app.tenant_id', true); BEGIN; SAVEPOINT a;"
            f" {ORDERS}; ROLLBACK TO SAVEPOINT a; SELECT 1; COMMIT; SELECT 2"
        )
        await conn.execute("SELECT 1;;SELECT 2;")


async def psycopg_extended(side: Side) -> None:
    async with await side.psycopg(prepare_threshold=1) as conn:
        await (
            await conn.execute("SELECT * FROM orders WHERE id > %s ORDER BY id", (0,))
        ).fetchall()
        cur = conn.cursor(binary=True)
        await (
            await cur.execute("SELECT * FROM billing.invoices WHERE total > %s", (0,))
        ).fetchall()
        for _ in range(2):
            stmt = "SELECT tenant_id, secret FROM orders WHERE amount > %s"
            await (await conn.execute(stmt, (1,), prepare=True)).fetchall()


async def psycopg_pipeline(side: Side) -> None:
    async with await side.psycopg() as conn, conn.pipeline() as pipeline:
        await conn.execute("SELECT * FROM orders WHERE id > %s ORDER BY id", (0,))
        await conn.execute("SELECT count(*) FROM customers WHERE id > %s", (0,))
        await pipeline.sync()
        await conn.execute("SELECT current_setting('app.tenant_id', true) WHERE %s", (True,))
        await pipeline.sync()
        await conn.execute("SELECT * FROM billing.invoices WHERE id > %s", (0,))


async def psycopg_transaction(side: Side) -> None:
    async with await side.psycopg(autocommit=False) as conn:
        await conn.execute(ORDERS)
        await conn.execute("SELECT * FROM customers WHERE id > %s", (0,))
        await conn.commit()
        async with conn.transaction():
            await conn.execute("UPDATE orders SET item = item WHERE id > %s", (0,))
            with contextlib.suppress(psycopg.errors.DivisionByZero):
                async with conn.transaction():
                    await conn.execute("SELECT 1/0")
            await conn.execute(ORDERS)
        await conn.rollback()
        async with conn.pipeline():
            await conn.execute("SELECT * FROM orders WHERE id > %s", (0,))
            await conn.execute(ORDERS)
        await conn.commit()


async def psycopg_errors(side: Side) -> None:
    async with await side.psycopg() as conn:
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            await conn.execute("SELECT 1/0")
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            await conn.execute(f"BEGIN; {ORDERS}; SELECT 1/0; {ORDERS}; COMMIT")
        await conn.execute("ROLLBACK")
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            await conn.execute("SELECT 1/%s::int", (0,))
        with contextlib.suppress(psycopg.errors.UndefinedColumn):
            await conn.execute("SELECT nocolumn FROM orders WHERE id = %s", (1,))
        await conn.execute(ORDERS)


async def psycopg_error_position_simple(side: Side) -> None:
    async with await side.psycopg() as conn:
        with contextlib.suppress(psycopg.errors.UndefinedColumn):
            await conn.execute("SELECT nocolumn FROM orders")
        with contextlib.suppress(psycopg.errors.UndefinedColumn):
            await conn.execute("BEGIN; SELECT 1; COMMIT; SELECT nocolumn FROM orders")


async def psycopg_pipeline_error(side: Side) -> None:
    async with await side.psycopg() as conn:
        with contextlib.suppress(psycopg.errors.DivisionByZero):
            async with conn.pipeline() as pipeline:
                await conn.execute("SELECT * FROM orders WHERE id > %s", (0,))
                await pipeline.sync()
                await conn.execute("SELECT 1/%s::int", (0,))
                await pipeline.sync()
        await conn.execute(ORDERS)


async def psycopg_copy(side: Side) -> None:
    async with await side.psycopg() as conn:
        cur = conn.cursor()
        async with cur.copy("COPY (SELECT * FROM orders ORDER BY id) TO STDOUT") as copy:
            async for _ in copy:
                pass
        async with cur.copy(
            "COPY (SELECT tenant_id FROM customers) TO STDOUT (FORMAT csv)"
        ) as copy:
            async for _ in copy:
                pass
        await conn.execute(ORDERS)


async def psycopg_empty_query(side: Side) -> None:
    async with await side.psycopg() as conn:
        for text in ("", ";", " -- nothing"):
            with contextlib.suppress(psycopg.ProgrammingError):
                await conn.execute(text)
        await conn.execute(ORDERS)


async def asyncpg_operations(side: Side) -> None:
    conn = await side.asyncpg()
    try:
        await conn.fetch(ORDERS)
        await conn.fetch("SELECT * FROM orders WHERE id > $1 ORDER BY id", 0)
        statement = await conn.prepare("SELECT tenant_id, secret FROM orders WHERE amount > $1")
        await statement.fetch(1)
        await statement.fetch(2)
        async with conn.transaction():
            await conn.executemany(
                "UPDATE orders SET item = item WHERE id = $1", [(i,) for i in range(1, 8)]
            )
            async with conn.transaction():
                await conn.fetch("SELECT * FROM customers")
            # Portal suspension: Execute max_rows=2 repeatedly.
            async for _ in conn.cursor("SELECT * FROM orders ORDER BY id", prefetch=2):
                pass
            cursor = await conn.cursor("SELECT * FROM billing.invoices ORDER BY id")
            await cursor.fetch(1)
            await cursor.fetch(5)
        with contextlib.suppress(asyncpg.DivisionByZeroError):
            await conn.fetch("SELECT 1/$1::int", 0)
        await conn.fetchval("SELECT count(*) FROM orders")
    finally:
        await conn.close()


async def raw_portal_suspension(side: Side) -> None:
    conn = await side.raw()
    try:
        await conn.exchange(
            parse("SELECT * FROM orders WHERE id > $1 ORDER BY id")
            + bind(("0",))
            + describe("P")
            + execute(max_rows=2)
            + execute(max_rows=2)
            + execute(max_rows=2)
            + execute(max_rows=2)
            + SYNC
        )
        # In an explicit transaction the portal outlives a Sync.
        await conn.exchange(query("BEGIN"))
        await conn.exchange(parse(ORDERS) + bind() + describe("P") + execute(max_rows=3) + SYNC)
        await conn.exchange(execute(max_rows=0) + SYNC)
        await conn.exchange(query("COMMIT"))
    finally:
        await conn.close()


async def raw_pipeline_syncs(side: Side) -> None:
    conn = await side.raw()
    try:
        await conn.exchange(
            run_query("BEGIN")
            + run_query(ORDERS)
            + SYNC
            + run_query("SELECT current_setting('app.tenant_id', true)")
            + run_query("COMMIT")
            + SYNC
            + run_query("SELECT count(*) FROM customers")
            + SYNC
            + run_query("BEGIN")
            + run_query("SAVEPOINT s")
            + run_query(ORDERS)
            + run_query("ROLLBACK TO SAVEPOINT s")
            + run_query("SELECT count(*) FROM orders")
            + run_query("COMMIT")
            + SYNC,
            ready=4,
        )
    finally:
        await conn.close()


async def raw_error_mid_pipeline(side: Side) -> None:
    conn = await side.raw()
    try:
        await conn.exchange(
            run_query(ORDERS)
            + run_query("SELECT 1/0")
            + run_query(ORDERS)
            + SYNC
            + run_query("SELECT count(*) FROM orders")
            + SYNC
            + run_query("BEGIN")
            + run_query("SELECT 1/0")
            + run_query(ORDERS)
            + SYNC
            + run_query(ORDERS)
            + SYNC
            + query("ROLLBACK")
            + run_query(ORDERS)
            + SYNC,
            ready=6,
        )
    finally:
        await conn.close()


async def raw_mixed_simple_and_extended(side: Side) -> None:
    conn = await side.raw()
    try:
        await conn.exchange(
            run_query("SELECT count(*) FROM orders")
            + query(f"SELECT 1; {ORDERS}")
            + run_query(ORDERS)
            + SYNC,
            ready=2,
        )
        await conn.exchange(query(f"BEGIN; {ORDERS}") + run_query(ORDERS) + SYNC, ready=2)
        await conn.exchange(query(f"COMMIT; {ORDERS}"))
    finally:
        await conn.close()


async def raw_query_joins_unsynced_extended(side: Side) -> None:
    """A one-statement Query after un-synced extended messages (PG 18: stays in 'T')."""
    conn = await side.raw()
    try:
        await conn.exchange(
            run_query("SELECT count(*) FROM orders") + query(ORDERS) + run_query(ORDERS) + SYNC,
            ready=2,
        )
    finally:
        await conn.close()


async def raw_named_statements(side: Side) -> None:
    conn = await side.raw()
    try:
        await conn.exchange(
            parse("SELECT * FROM orders WHERE id > $1", name="s1") + describe("S", "s1") + SYNC
        )
        await conn.exchange(
            bind(("2",), statement="s1", portal="p1")
            + describe("P", "p1")
            + execute("p1")
            + close("P", "p1")
            + SYNC
        )
        await conn.exchange(bind(("0",), statement="s1") + execute() + close("S", "s1") + SYNC)
        await conn.exchange(run_query(ORDERS) + FLUSH + SYNC)
    finally:
        await conn.close()


async def raw_empty_and_copy(side: Side) -> None:
    conn = await side.raw()
    try:
        await conn.exchange(query(""))
        await conn.exchange(parse("") + bind() + describe("P") + execute() + SYNC)
        await conn.exchange(query("COPY (SELECT * FROM orders ORDER BY id) TO STDOUT"))
        await conn.exchange(run_query("COPY (SELECT id, tenant_id FROM orders) TO STDOUT") + SYNC)
    finally:
        await conn.close()


async def raw_error_then_more_before_sync(side: Side) -> None:
    """The server's error arrives before the client sent the rest of its pipeline."""
    conn = await side.raw()
    try:
        conn.send(parse("SELECT nocolumn FROM orders"))
        conn.send(FLUSH)
        await conn.until("E")  # flushed at once by the server
        await conn.exchange(bind() + describe("P") + execute() + SYNC)
        await conn.exchange(query(ORDERS))
    finally:
        await conn.close()


SCENARIOS: list[Any] = [
    pytest.param(scenario, id=scenario.__name__)
    for scenario in (
        psycopg_simple,
        psycopg_multi_statement,
        psycopg_extended,
        psycopg_pipeline,
        psycopg_transaction,
        psycopg_errors,
        psycopg_pipeline_error,
        psycopg_copy,
        psycopg_empty_query,
        asyncpg_operations,
        raw_portal_suspension,
        raw_pipeline_syncs,
        raw_error_mid_pipeline,
        raw_mixed_simple_and_extended,
        raw_query_joins_unsynced_extended,
        raw_error_then_more_before_sync,
        raw_named_statements,
        raw_empty_and_copy,
    )
] + [
    pytest.param(
        psycopg_error_position_simple,
        id="psycopg_error_position_simple",
    ),
]


# Scenarios that differ only on some server versions: name -> (from version, reason).
# Scenario name -> (server_version_num from which it differs, reason): none known now.
VERSION_BUGS: dict[str, tuple[int, str]] = {}


@pytest.mark.security
@pytest.mark.parametrize("scenario", SCENARIOS)
async def test_client_sees_what_postgres_sends(
    sides: tuple[Side, Side], scenario: Scenario, pg: Cluster, request: pytest.FixtureRequest
) -> None:
    version_bug = VERSION_BUGS.get(scenario.__name__)
    if version_bug is not None and pg.version >= version_bug[0]:
        request.applymarker(pytest.mark.xfail(strict=True, reason=version_bug[1]))
    via_proxy, direct = sides
    assert via_proxy.relay is not None
    assert direct.relay is not None
    await scenario(via_proxy)
    from_proxy = await via_proxy.relay.last()
    await scenario(direct)
    from_postgres = await direct.relay.last()
    assert from_postgres, "the scenario produced no messages"
    assert [k for k, _ in from_proxy] == [k for k, _ in from_postgres]
    assert from_proxy == from_postgres


async def test_direct_reference_sees_the_tenant_rows(sides: tuple[Side, Side]) -> None:
    """The comparison is not vacuous: the direct side reads acme's rows, not zero rows."""
    _, direct = sides
    assert direct.relay is not None
    await psycopg_simple(direct)
    messages = await direct.relay.last()
    rows = [payload for kind, payload in messages if kind == "D"]
    assert len(rows) == 5 + 3 + 1  # orders, customers, current_setting
    assert all(b"acme" in row for row in rows)
    assert not any(b"globex" in row or b"initech" in row for row in rows)
