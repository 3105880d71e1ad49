"""Forwarding fidelity: what a client sees through the proxy is what it sees
from PostgreSQL directly (simple and extended protocol, pipelines, COPY,
notices, notifications, ParameterStatus, portal suspension, transaction status).

The proxy runs in ``enforce`` mode with the :func:`proxy_helpers.allow_all`
inspector, so no statement is analysed, rewritten or injected: every
difference from a direct connection is a forwarding bug.  Transcripts are
compared byte for byte where the protocol allows it.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pg8000.native
import psycopg
import pytest
from proxy_helpers import (
    Proxy,
    RawClient,
    bind,
    error_fields,
    errors_of,
    execute,
    function_call,
    msg,
    parse,
    proxy_server,
    query,
    rows_of,
    start_proxy,
    stop_when_idle,
    sync,
    wait_for,
)
from psycopg import errors, pq

from support.db import TenantDb

pytestmark = pytest.mark.postgres

Conn = psycopg.Connection[tuple[Any, ...]]
USER, PASSWORD = "acme_app", "acme-pw"


@pytest.fixture(scope="module")
def proxy(tenant_db: TenantDb) -> Iterator[Proxy]:
    running = start_proxy(tenant_db.policy("enforce"))
    try:
        yield running
    finally:
        stop_when_idle(running)


@pytest.fixture
def conn(proxy: Proxy) -> Iterator[Conn]:
    with psycopg.connect(proxy.dsn(USER, PASSWORD), autocommit=True) as connection:
        yield connection


@pytest.fixture
def direct(tenant_db: TenantDb) -> Iterator[Conn]:
    """``app_tenant`` straight to PostgreSQL: the reference behaviour."""
    with psycopg.connect(tenant_db.app_dsn, autocommit=True) as connection:
        yield connection


@pytest.fixture
async def apg(proxy: Proxy) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(
        host=proxy.host, port=proxy.port, user=USER, password=PASSWORD, database="app", ssl=False
    )
    try:
        yield connection
    finally:
        await connection.close()


def raw_proxy(proxy: Proxy) -> RawClient:
    raw = RawClient(proxy.host, proxy.port)
    raw.login(USER, PASSWORD)
    return raw


def raw_direct(tenant_db: TenantDb) -> RawClient:
    raw = RawClient(tenant_db.host, tenant_db.port)
    raw.login(tenant_db.app_user, tenant_db.app_password)
    return raw


def transcript(raw: RawClient, data: bytes, syncs: int) -> list[tuple[bytes, bytes]]:
    """Send ``data``; every message up to the ``syncs``-th ReadyForQuery."""
    raw.send(data)
    out: list[tuple[bytes, bytes]] = []
    for _ in range(syncs):
        out.extend(raw.read_until_ready())
    return out


def without_schema(messages: list[tuple[bytes, bytes]]) -> list[tuple[bytes, Any]]:
    """Messages with ErrorResponse fields minus the schema (pg_temp_N differs per backend)."""
    return [
        (kind, {k: v for k, v in error_fields(payload).items() if k != "s"})
        if kind == b"E"
        else (kind, payload)
        for kind, payload in messages
    ]


def both_transcripts(
    proxy: Proxy, tenant_db: TenantDb, data: bytes, syncs: int
) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]]:
    with raw_proxy(proxy) as via, raw_direct(tenant_db) as ref:
        return transcript(via, data, syncs), transcript(ref, data, syncs)


# --- byte-for-byte transcripts ----------------------------------------------------------


def test_simple_query_transcript(proxy: Proxy, tenant_db: TenantDb) -> None:
    data = query("SELECT 1 AS a; SELECT 'x' AS b, NULL::int AS c; VALUES (1), (2); ;")
    data += query("SELECT 1; SELECT 1/0; SELECT 3")  # the rest of the string is skipped
    data += query("")  # EmptyQueryResponse
    data += query("BEGIN; SELECT 1/0")
    data += query("SELECT 'in failed transaction'")
    data += query("ROLLBACK")
    via, ref = both_transcripts(proxy, tenant_db, data, syncs=6)
    assert via == ref
    kinds = b"".join(kind for kind, _ in via)
    assert kinds.count(b"Z") == 6
    assert [p for k, p in via if k == b"Z"] == [b"I", b"I", b"I", b"E", b"E", b"I"]


def test_extended_pipeline_transcript(proxy: Proxy, tenant_db: TenantDb) -> None:
    describe_statement = msg(b"D", b"S" + b"s1\x00")
    describe_portal = msg(b"D", b"P" + b"\x00")
    data = b"".join(
        [
            # segment 1: named statement, describe, bind, execute in pieces
            parse("s1", "SELECT g, 'row ' || g FROM generate_series(1, 7) g"),
            describe_statement,
            bind("p1", "s1"),
            execute("p1", 3),  # PortalSuspended
            execute("p1", 3),
            execute("p1", 3),  # the last row, then CommandComplete
            msg(b"C", b"Ps1\x00"),  # Close portal
            sync(),
            # segment 2: an error in the middle; everything up to Sync is skipped
            parse("", "SELECT 1"),
            bind("", ""),
            execute(),
            parse("", "SELECT 1/0"),
            bind("", ""),
            execute(),
            parse("", "SELECT 'skipped'"),
            bind("", ""),
            describe_portal,
            execute(),
            sync(),
            # segment 3: the connection works again; empty query; reuse of s1
            parse("", ""),
            bind("", ""),
            execute(),
            bind("", "s1"),
            describe_portal,
            execute("", 2),
            msg(b"H"),  # Flush
            msg(b"C", b"Ss1\x00"),  # Close statement
            sync(),
            # segment 4: Sync alone
            sync(),
        ]
    )
    via, ref = both_transcripts(proxy, tenant_db, data, syncs=4)
    assert via == ref
    assert b"s" in [kind for kind, _ in via]
    assert [e["C"] for e in errors_of(via)] == ["22012"]


def test_deferred_constraint_error_at_sync(proxy: Proxy, tenant_db: TenantDb) -> None:
    """An error raised while the server processes Sync (implicit COMMIT) is answered
    by ErrorResponse + ReadyForQuery after the Execute already completed."""
    setup = query("CREATE TEMP TABLE deferred (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    data = b"".join(
        [
            parse("", "INSERT INTO deferred VALUES (1), (1)"),
            bind("", ""),
            execute(),
            sync(),
            query("SELECT 'still here'"),
        ]
    )
    with raw_proxy(proxy) as via, raw_direct(tenant_db) as ref:
        transcript(ref, setup, 1)
        transcript(via, setup, 1)
        expected = transcript(ref, data, 2)
        got = transcript(via, data, 2)
    assert [e["C"] for e in errors_of(expected)] == ["23505"]
    assert without_schema(got) == without_schema(expected)


def test_psycopg_deferred_constraint_in_autocommit(conn: Conn) -> None:
    conn.execute("CREATE TEMP TABLE deferred2 (id int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    with pytest.raises(errors.UniqueViolation):
        conn.execute("INSERT INTO deferred2 VALUES (%s), (%s)", (1, 1))
    assert conn.execute("SELECT 'usable'").fetchone() == ("usable",)


# --- psycopg ---------------------------------------------------------------------------


def _pipeline_outcomes(connection: Conn) -> tuple[dict[int, Any], set[str], Any]:
    """Run a pipeline of 60 statements, a Sync every 10, ``1/0`` as the 31st.

    Returns each statement's rows (or "skipped"), the exception types psycopg
    raised along the way (where it notices the error depends on timing, so
    only the types are compared) and the result of a statement afterwards.
    """
    cursors: dict[int, psycopg.Cursor[tuple[Any, ...]]] = {}
    raised: set[str] = set()
    try:
        with connection.pipeline() as pipeline:
            for i in range(60):
                sql = "SELECT 1 / 0" if i == 30 else "SELECT %s::int * 2, %s::text"
                params = () if i == 30 else (i, f"stmt {i}")
                try:
                    cursors[i] = connection.cursor().execute(sql, params, prepare=i % 7 == 0)
                except psycopg.Error as exc:
                    raised.add(type(exc).__name__)
                if i == 30:
                    # let the error come back before the rest of the segment is sent
                    # (what a busy client does by chance; here every time)
                    time.sleep(0.3)
                if i % 10 == 9:
                    try:
                        pipeline.sync()
                    except psycopg.Error as exc:
                        raised.add(type(exc).__name__)
    except psycopg.Error as exc:
        raised.add(type(exc).__name__)
    outcomes: dict[int, Any] = {}
    for i in range(60):
        try:
            outcomes[i] = cursors[i].fetchall()
        except (KeyError, psycopg.ProgrammingError):
            outcomes[i] = "skipped"
        except psycopg.Error as exc:
            outcomes[i] = type(exc).__name__
    try:
        after: Any = connection.execute("SELECT 'after'").fetchall()
    except psycopg.Error as exc:
        after = type(exc).__name__
    return outcomes, raised, after


def test_psycopg_pipeline_error_in_the_middle(conn: Conn, direct: Conn) -> None:
    ref_outcomes, ref_raised, ref_after = _pipeline_outcomes(direct)
    assert ref_outcomes[29] == [(58, "stmt 29")]
    assert all(ref_outcomes[i] == "skipped" for i in range(30, 40))
    assert ref_outcomes[40] == [(80, "stmt 40")]  # the next Sync segment runs again
    assert "DivisionByZero" in ref_raised
    assert ref_after == [("after",)]
    assert _pipeline_outcomes(conn) == (ref_outcomes, ref_raised, ref_after)


def test_error_before_rest_of_segment_arrives(proxy: Proxy, tenant_db: TenantDb) -> None:
    """The server's ErrorResponse reaches the proxy before the client sent the rest
    of the segment (a client that Flushes and reads, like libpq pipeline mode)."""
    first = parse("", "SELECT 1/0") + bind("", "") + execute() + msg(b"H")
    rest = parse("", "SELECT 2") + bind("", "") + execute() + sync() + query("SELECT 3")
    results = []
    with raw_proxy(proxy) as via, raw_direct(tenant_db) as ref:
        for raw in (ref, via):
            raw.send(first)
            head = [raw.read() or (b"", b"") for _ in range(2)]
            assert [kind for kind, _ in head] == [b"1", b"E"]  # 1/0 fails while planning
            assert error_fields(head[1][1])["C"] == "22012"
            results.append(transcript(raw, rest, 2))
    expected, got = results
    assert [k for k, _ in expected] == [b"Z", b"T", b"D", b"C", b"Z"]
    assert got == expected


def test_psycopg_pipeline_many_statements(conn: Conn) -> None:
    with conn.pipeline(), conn.cursor() as cur:
        cur.executemany("SELECT %s::int", [(i,) for i in range(500)], returning=True)
        values = []
        while True:
            values.append(cur.fetchone())
            if not cur.nextset():
                break
    assert values == [(i,) for i in range(500)]


async def test_psycopg_async_pipeline(proxy: Proxy) -> None:
    async with await psycopg.AsyncConnection.connect(
        proxy.dsn(USER, PASSWORD), autocommit=True
    ) as aconn:
        async with aconn.pipeline():
            cursors = [await aconn.execute("SELECT %s::int + 1", (i,)) for i in range(100)]
        assert [(await c.fetchone()) for c in cursors] == [(i + 1,) for i in range(100)]


def test_psycopg_binary_and_prepared(conn: Conn) -> None:
    values = (
        uuid.UUID("12345678-1234-5678-1234-567812345678"),
        decimal.Decimal("12345678901234567890.123456789"),
        dt.datetime(2024, 2, 29, 12, 30, tzinfo=dt.UTC),
        [1, 2, None, 4],
        b"\x00\xff" * 1000,
        "ünïcødé ☃",
    )
    sql = "SELECT %s::uuid, %s::numeric, %s::timestamptz, %s::int[], %s::bytea, %s::text"
    for binary in (False, True):
        for _ in range(7):  # prepare_threshold=5: becomes a named prepared statement
            with conn.cursor(binary=binary) as cur:
                row = cur.execute(sql, values).fetchone()
                assert row == values
                if binary:
                    assert cur.pgresult is not None
                    assert cur.pgresult.fformat(0) == pq.Format.BINARY


def test_psycopg_client_cursor_multi_statement(conn: Conn) -> None:
    cur = psycopg.ClientCursor(conn)
    cur.execute("SELECT %s; SELECT %s, %s", (1, "two", None))
    assert cur.fetchall() == [(1,)]
    assert cur.nextset()
    assert cur.fetchall() == [("two", None)]


def test_psycopg_server_side_cursor(conn: Conn) -> None:
    with conn.transaction(), conn.cursor(name="big", binary=True) as cur:
        cur.itersize = 17
        cur.execute("SELECT g FROM generate_series(1, 1000) g")
        assert sum(row[0] for row in cur) == 500500


def test_psycopg_copy_in_and_out(conn: Conn, direct: Conn) -> None:
    conn.execute("CREATE TEMP TABLE copied (id int, payload text, raw bytea)")
    rows = [(i, f"line {i}\ttab", bytes([i % 256]) * 10) for i in range(5000)]
    with conn.cursor() as cur, cur.copy("COPY copied FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)
    with (
        conn.cursor() as cur,
        cur.copy("COPY copied (id, payload, raw) FROM STDIN (FORMAT binary)") as copy,
    ):
        copy.set_types(["int4", "text", "bytea"])
        for row in rows:
            copy.write_row(row)
    assert conn.execute("SELECT count(*), sum(id) FROM copied").fetchone() == (
        10000,
        2 * sum(range(5000)),
    )

    out = "COPY (SELECT g, md5(g::text) FROM generate_series(1, 20000) g) TO STDOUT"
    chunks = {}
    for name, connection in (("proxy", conn), ("direct", direct)):
        with connection.cursor() as cur, cur.copy(out) as copy:
            chunks[name] = b"".join(bytes(chunk) for chunk in copy)
    assert chunks["proxy"] == chunks["direct"]
    assert chunks["proxy"].count(b"\n") == 20000


def test_psycopg_copy_fail(conn: Conn) -> None:
    conn.execute("CREATE TEMP TABLE copy_fail (id int)")
    with (  # noqa: PT012
        pytest.raises(RuntimeError, match="gives up"),
        conn.cursor() as cur,
        cur.copy("COPY copy_fail FROM STDIN") as copy,
    ):
        copy.write_row((1,))
        raise RuntimeError("client gives up")  # psycopg sends CopyFail
    assert conn.info.transaction_status == pq.TransactionStatus.IDLE
    assert conn.execute("SELECT count(*) FROM copy_fail").fetchone() == (0,)


def test_copy_error_from_server(conn: Conn) -> None:
    conn.execute("CREATE TEMP TABLE copy_bad (id int)")
    with (
        pytest.raises(errors.InvalidTextRepresentation),
        conn.cursor() as cur,
        cur.copy("COPY copy_bad FROM STDIN") as copy,
    ):
        copy.write(b"1\nnot a number\n3\n")
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_notice_reaches_client(conn: Conn) -> None:
    notices: list[tuple[str | None, str | None]] = []
    conn.add_notice_handler(lambda diag: notices.append((diag.severity, diag.message_primary)))
    conn.execute("DO $$ BEGIN RAISE NOTICE 'x'; RAISE WARNING 'careful %', 42; END $$")
    assert notices == [("NOTICE", "x"), ("WARNING", "careful 42")]


def test_listen_notify_between_sessions(proxy: Proxy, conn: Conn) -> None:
    conn.execute("LISTEN tg_channel")
    with psycopg.connect(proxy.dsn("globex_app", "globex-pw"), autocommit=True) as other:
        other.execute("NOTIFY tg_channel, 'hello'")
        other.execute("SELECT pg_notify('tg_channel', %s)", ("second",))
    received = [(n.channel, n.payload) for n in conn.notifies(timeout=10, stop_after=2)]
    assert received == [("tg_channel", "hello"), ("tg_channel", "second")]


async def test_asyncpg_listen_notify(proxy: Proxy, apg: asyncpg.Connection) -> None:
    import asyncio  # noqa: PLC0415

    got: asyncio.Queue[str] = asyncio.Queue()
    await apg.add_listener("tg_async", lambda *args: got.put_nowait(args[3]))
    sender = await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user="initech_app",
        password="initech-pw",
        database="app",
        ssl=False,
    )
    try:
        await sender.execute("SELECT pg_notify('tg_async', 'from initech')")
    finally:
        await sender.close()
    assert await asyncio.wait_for(got.get(), 10) == "from initech"


def test_parameter_status(proxy: Proxy) -> None:
    with psycopg.connect(
        proxy.dsn(USER, PASSWORD, application_name="startup-name"), autocommit=True
    ) as conn:
        assert conn.info.parameter_status("application_name") == "startup-name"
        conn.execute("SET application_name = 'changed'")
        assert conn.info.parameter_status("application_name") == "changed"
        conn.execute("SET TimeZone = 'America/New_York'")
        assert conn.info.parameter_status("TimeZone") == "America/New_York"
        with conn.transaction(), conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL application_name = 'local'")
            assert conn.info.parameter_status("application_name") == "local"
        assert conn.info.parameter_status("application_name") == "changed"


@pytest.mark.parametrize(
    "statement",
    ["SET client_encoding = 'LATIN1'", "SET standard_conforming_strings = off"],
)
def test_changing_a_lexing_pin_ends_the_session(proxy: Proxy, conn: Conn, statement: str) -> None:
    with pytest.raises(psycopg.OperationalError):
        conn.execute(statement)
    assert conn.closed or conn.info.status == psycopg.pq.ConnStatus.BAD
    with psycopg.connect(proxy.dsn(USER, PASSWORD)) as fresh:
        assert fresh.execute("SHOW client_encoding").fetchone() == ("UTF8",)


def test_transaction_status_tracking(proxy: Proxy, conn: Conn) -> None:
    status = pq.TransactionStatus
    pid = conn.info.backend_pid
    session = proxy_server(proxy).sessions[pid]
    assert conn.info.transaction_status == status.IDLE
    conn.execute("BEGIN")
    assert conn.info.transaction_status == status.INTRANS
    assert session.tracker.status == "T"
    with pytest.raises(errors.DivisionByZero):
        conn.execute("SELECT 1/0")
    assert conn.info.transaction_status == status.INERROR
    assert session.tracker.status == "E"
    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute("SELECT 1")
    conn.execute("ROLLBACK")
    assert conn.info.transaction_status == status.IDLE
    assert session.tracker.status == "I"
    assert session.tracker.idle


def test_proxy_hands_out_its_own_backend_pid(proxy: Proxy, conn: Conn) -> None:
    real = conn.execute("SELECT pg_backend_pid()").fetchone()
    assert real is not None
    assert conn.info.backend_pid in proxy_server(proxy).sessions
    assert conn.info.backend_pid != real[0]


# --- asyncpg ---------------------------------------------------------------------------


async def test_asyncpg_binary_types(apg: asyncpg.Connection) -> None:
    values = (
        uuid.uuid4(),
        decimal.Decimal("-98765.4321"),
        dt.datetime(2001, 2, 3, 4, 5, 6, 789000, tzinfo=dt.UTC),
        [[1, 2], [3, 4]],
        ["a", None, "c"],
        {"k": [1, 2, {"n": None}], "s": "ü"},
        b"\x00\x01\x02" * 100000,
        dt.date(1999, 12, 31),
        dt.timedelta(days=3, seconds=7),
    )
    await apg.set_type_codec("jsonb", encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    stmt = await apg.prepare(
        "SELECT $1::uuid, $2::numeric, $3::timestamptz, $4::int[], $5::text[], $6::jsonb,"
        " $7::bytea, $8::date, $9::interval"
    )
    for _ in range(3):
        row = await stmt.fetchrow(*values)
        assert row is not None
        assert tuple(row) == values


async def test_asyncpg_prepared_statements(apg: asyncpg.Connection) -> None:
    stmt = await apg.prepare("SELECT $1::int + g FROM generate_series(1, $2::int) g")
    assert [r[0] for r in await stmt.fetch(10, 3)] == [11, 12, 13]
    assert await stmt.fetchval(100, 1) == 101
    assert [a.name for a in stmt.get_attributes()] == ["?column?"]
    with pytest.raises(asyncpg.DivisionByZeroError):
        await apg.fetchval("SELECT 1 / $1::int", 0)
    assert await stmt.fetchval(1, 1) == 2  # still prepared after an error
    await apg.execute("CREATE TEMP TABLE many (id int, label text)")
    await apg.executemany("INSERT INTO many VALUES ($1, $2)", [(i, str(i)) for i in range(300)])
    result = await apg.copy_records_to_table("many", records=[(i, "copied") for i in range(1000)])
    assert result == "COPY 1000"
    assert await apg.fetchval("SELECT count(*) FROM many") == 1300


async def test_asyncpg_cursor_portal_suspension(apg: asyncpg.Connection) -> None:
    async with apg.transaction():
        total = 0
        count = 0
        async for record in apg.cursor("SELECT g FROM generate_series(1, 1000) g", prefetch=7):
            total += record[0]
            count += 1
        assert (count, total) == (1000, 500500)
        cursor = await apg.cursor("SELECT g FROM generate_series(1, 100) g")
        assert [r[0] for r in await cursor.fetch(5)] == [1, 2, 3, 4, 5]
        await cursor.forward(10)
        assert (await cursor.fetchrow())[0] == 16  # type: ignore[index]


async def test_asyncpg_notice(apg: asyncpg.Connection) -> None:
    messages: list[str] = []
    apg.add_log_listener(lambda _conn, message: messages.append(message.message))
    await apg.execute("DO $$ BEGIN RAISE NOTICE 'from asyncpg'; END $$")
    assert wait_for(lambda: messages == ["from asyncpg"], timeout=5)


# --- pg8000 ----------------------------------------------------------------------------


def test_pg8000_extended_and_simple(proxy: Proxy) -> None:
    conn = pg8000.native.Connection(
        USER, host=proxy.host, port=proxy.port, database="app", password=PASSWORD
    )
    try:
        assert conn.run("SELECT :a::int + :b::int, :t::text", a=1, b=2, t="x") == [[3, "x"]]
        conn.run("CREATE TEMP TABLE p8 (v numeric)")
        conn.run("INSERT INTO p8 VALUES (:v)", v=decimal.Decimal("1.5"))
        assert conn.run("SELECT v FROM p8") == [[decimal.Decimal("1.5")]]
        with pytest.raises(pg8000.native.DatabaseError):
            conn.run("SELECT 1/0")
        stmt = conn.prepare("SELECT :x::int * 3")
        assert stmt.run(x=5) == [[15]]
        stmt.close()
    finally:
        conn.close()


# --- FunctionCall ----------------------------------------------------------------------


def test_function_call_rejected(proxy: Proxy) -> None:
    with raw_proxy(proxy) as raw:
        [[oid]] = rows_of(raw.simple("SELECT 'int4pl(int4,int4)'::regprocedure::oid"))
        assert oid is not None
        raw.send(function_call(int(oid), [b"1", b"2"]))
        messages = raw.read_until_ready()
        assert [kind for kind, _ in messages] == [b"E", b"Z"]
        fields = error_fields(messages[0][1])
        assert (fields["S"], fields["C"]) == ("ERROR", "42501")
        assert fields["M"].startswith("tenantgate:")
        assert "H" in fields
        assert messages[1][1] == b"I"
        assert rows_of(raw.simple("SELECT int4pl(1, 2)")) == [["3"]]
        # inside a transaction the rejection aborts it, as any error does
        raw.simple("BEGIN")
        raw.send(function_call(int(oid), [struct.pack("!i", 1), struct.pack("!i", 2)]))
        assert [p for k, p in raw.read_until_ready() if k == b"Z"] == [b"E"]
        assert [p for k, p in raw.simple("ROLLBACK") if k == b"Z"] == [b"I"]
