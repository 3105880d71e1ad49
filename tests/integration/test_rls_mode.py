"""rls mode end to end: statements without tenant predicates see and change only the
caller's rows, through psycopg (simple, extended, pipeline), asyncpg and psql; and
every GUC-tampering vector of the escape catalogue fails.

The proxy injects ``set_config('app.tenant_id', <tenant>, true)`` into every
transaction; the database (``support.db``) has fail-closed RLS keyed on that
setting.  Reads are compared with :meth:`TenantDb.snapshot` (read as superuser),
writes with snapshots of the other tenants before and after.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import psycopg
import pytest
from proxy_helpers import (
    RawClient,
    ServerError,
    error_fields,
    function_call,
    rows_of,
    stop_when_idle,
)
from psycopg import errors

from support.db import (
    CUSTOMERS_PER_TENANT,
    INVOICES_PER_TENANT,
    ORDERS_PER_TENANT,
    TENANTS,
    TenantDb,
)
from support.proxy import RunningProxy
from tenantgate.compiled import lane_class

pytestmark = pytest.mark.postgres

Conn = psycopg.Connection[tuple[Any, ...]]
SCOPED = ("orders", "customers", "billing.invoices")
SEEDED = {
    "orders": ORDERS_PER_TENANT,
    "customers": CUSTOMERS_PER_TENANT,
    "billing.invoices": INVOICES_PER_TENANT,
}
RLS_REFUSED = "row-level security"
SET_CONFIG_OID = 2078  # pg_catalog.set_config(text, text, boolean)


@pytest.fixture(scope="module")
def proxy(tenant_db: TenantDb) -> Iterator[RunningProxy]:
    running = RunningProxy(tenant_db.policy("rls"))
    try:
        yield running
    finally:
        stop_when_idle(running)


@pytest.fixture(scope="module")
def both_proxy(tenant_db: TenantDb) -> Iterator[RunningProxy]:
    running = RunningProxy(tenant_db.policy("both"))
    try:
        yield running
    finally:
        stop_when_idle(running)


def dsn(proxy: RunningProxy, tenant_db: TenantDb, tenant: str) -> str:
    user = tenant_db.user(tenant)
    return proxy.dsn(user.name, user.password)


def connect(
    proxy: RunningProxy, tenant_db: TenantDb, tenant: str, autocommit: bool = True, **kw: Any
) -> Conn:
    return psycopg.connect(dsn(proxy, tenant_db, tenant), autocommit=autocommit, **kw)


@pytest.fixture
def acme(proxy: RunningProxy, tenant_db: TenantDb) -> Iterator[Conn]:
    with connect(proxy, tenant_db, "acme") as conn:
        yield conn


def assert_only(rows: list[tuple[Any, ...]], tenant: str, column: int = 0) -> None:
    seen = {row[column] for row in rows}
    assert seen <= {tenant}, f"rows of other tenants leaked: {sorted(seen - {tenant})}"


def assert_isolated(conn: Conn, tenant: str) -> None:
    """The session still sees exactly ``tenant``'s orders and the setting names it."""
    rows = conn.execute("SELECT tenant_id FROM orders").fetchall()
    assert len(rows) == ORDERS_PER_TENANT
    assert_only(rows, tenant)
    assert conn.execute("SELECT current_setting('app.tenant_id', true)").fetchone() == (tenant,)


PROTOCOLS = ("simple", "prepared", "pipeline", "pipeline_prepared", "in_transaction")


def run(conn: Conn, statement: str, protocol: str) -> None:
    """Run ``statement`` as a simple Query, as a named prepared statement (Parse + Sync,
    then Bind/Execute), in a pipeline (unnamed, or named: Parse sent apart from
    Bind/Describe/Execute), or inside a multi-statement string."""
    if protocol == "simple":
        conn.execute(statement)
    elif protocol == "prepared":
        conn.execute(statement, prepare=True)
    elif protocol == "pipeline":
        with conn.pipeline():
            conn.execute(statement)
    elif protocol == "pipeline_prepared":
        with conn.pipeline():
            conn.execute(statement, prepare=True)
    else:
        conn.execute(f"BEGIN; SELECT 1; {statement}; SELECT tenant_id FROM orders")


def others_unchanged(tenant_db: TenantDb, tenant: str) -> dict[str, Any]:
    return {t: tenant_db.snapshot(t) for t in TENANTS if t != tenant}


# --- reads: only the caller's rows ---------------------------------------------------------


@pytest.mark.security
@pytest.mark.parametrize("tenant", TENANTS)
def test_simple_protocol_reads_exactly_own_rows(
    proxy: RunningProxy, tenant_db: TenantDb, tenant: str
) -> None:
    expected = tenant_db.snapshot(tenant)
    with connect(proxy, tenant_db, tenant) as conn:
        for table in SCOPED:
            # No parameters: psycopg sends a simple Query.
            rows = conn.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
            assert rows == expected[table]
            assert len(rows) == SEEDED[table]
        joined = conn.execute(
            "SELECT o.tenant_id, i.tenant_id FROM orders o JOIN billing.invoices i"
            " ON i.order_id = o.id"
        ).fetchall()
        assert len(joined) == INVOICES_PER_TENANT
        assert {r for row in joined for r in row} == {tenant}
        assert conn.execute("SELECT count(*) FROM plans").fetchone() == (3,)


@pytest.mark.security
@pytest.mark.parametrize("tenant", TENANTS)
def test_extended_protocol_reads_exactly_own_rows(
    proxy: RunningProxy, tenant_db: TenantDb, tenant: str
) -> None:
    expected = tenant_db.snapshot(tenant)
    with connect(proxy, tenant_db, tenant) as conn:
        for table in SCOPED:
            query = f"SELECT * FROM {table} WHERE id > %s ORDER BY id"
            assert conn.execute(query, (0,)).fetchall() == expected[table]
            # Named prepared statements, run repeatedly (each run a new transaction).
            for _ in range(3):
                assert conn.execute(query, (0,), prepare=True).fetchall() == expected[table]
            binary = conn.cursor(binary=True).execute(query, (0,)).fetchall()
            assert binary == expected[table]


@pytest.mark.security
def test_pipeline_reads_exactly_own_rows(proxy: RunningProxy, tenant_db: TenantDb) -> None:
    expected = tenant_db.snapshot("globex")
    with connect(proxy, tenant_db, "globex") as conn:
        with conn.pipeline() as pipeline:
            cursors = [conn.execute(f"SELECT * FROM {t} ORDER BY id") for t in SCOPED]
            pipeline.sync()
            more = [
                conn.execute(f"SELECT * FROM {t} WHERE id > %s ORDER BY id", (0,)) for t in SCOPED
            ]
            pipeline.sync()
            setting = conn.execute("SELECT current_setting('app.tenant_id', true)")
        for table, cur in zip(SCOPED, cursors, strict=True):
            assert cur.fetchall() == expected[table]
        for table, cur in zip(SCOPED, more, strict=True):
            assert cur.fetchall() == expected[table]
        assert setting.fetchone() == ("globex",)


@pytest.mark.security
def test_non_autocommit_transactions(proxy: RunningProxy, tenant_db: TenantDb) -> None:
    expected = tenant_db.snapshot("initech")["orders"]
    with connect(proxy, tenant_db, "initech", autocommit=False) as conn:
        for _ in range(2):
            assert conn.execute("SELECT * FROM orders ORDER BY id").fetchall() == expected
            assert (
                conn.execute("SELECT * FROM orders WHERE id > %s ORDER BY id", (0,)).fetchall()
                == expected
            )
            conn.commit()
        assert conn.execute("SELECT * FROM orders ORDER BY id").fetchall() == expected
        conn.rollback()
        with conn.pipeline():
            cur = conn.execute("SELECT * FROM orders ORDER BY id")
        assert cur.fetchall() == expected
        conn.commit()


def raise_in_savepoint(conn: Conn, query: str, expected: list[tuple[Any, ...]]) -> None:
    with conn.transaction():
        assert conn.execute(query, (0,)).fetchall() == expected
        conn.execute("SELECT 1/0")


@pytest.mark.security
def test_explicit_transactions_and_savepoints(proxy: RunningProxy, tenant_db: TenantDb) -> None:
    expected = tenant_db.snapshot("acme")["orders"]
    # No automatic server-side prepares: see test_rollback_after_auto_prepared_statements.
    acme = connect(proxy, tenant_db, "acme", prepare_threshold=None)
    query = "SELECT * FROM orders ORDER BY id"
    # BEGIN/COMMIT as separate simple queries.
    acme.execute("BEGIN")
    assert acme.execute(query).fetchall() == expected
    acme.execute("SAVEPOINT s1")
    assert acme.execute(query).fetchall() == expected
    acme.execute("ROLLBACK TO SAVEPOINT s1")  # reverts the set_config made after SAVEPOINT
    assert acme.execute(query).fetchall() == expected
    acme.execute("RELEASE SAVEPOINT s1")
    assert acme.execute(query).fetchall() == expected
    acme.execute("COMMIT")
    assert acme.execute(query).fetchall() == expected
    # psycopg transaction blocks with a nested savepoint rolled back by an exception.
    with acme.transaction():
        assert acme.execute(query).fetchall() == expected
        with pytest.raises(errors.DivisionByZero):
            raise_in_savepoint(acme, "SELECT * FROM orders WHERE id > %s ORDER BY id", expected)
        assert acme.execute(query).fetchall() == expected
        assert (
            acme.execute("SELECT * FROM orders WHERE id > %s ORDER BY id", (0,)).fetchall()
            == expected
        )
    assert_isolated(acme, "acme")
    acme.close()


@pytest.mark.security
def test_multi_statement_strings(acme: Conn, tenant_db: TenantDb) -> None:
    expected = tenant_db.snapshot("acme")["orders"]
    cur = acme.execute(
        "BEGIN; SELECT * FROM orders ORDER BY id; COMMIT; SELECT * FROM orders ORDER BY id;"
        " BEGIN; SAVEPOINT y; SELECT * FROM orders ORDER BY id;"
        " ROLLBACK TO SAVEPOINT y; SELECT * FROM orders ORDER BY id; ROLLBACK;"
        " SELECT * FROM orders ORDER BY id"
    )
    results: list[list[tuple[Any, ...]]] = []
    while True:
        if cur.description is not None:
            results.append(cur.fetchall())
        if not cur.nextset():
            break
    assert results == [expected] * 5
    assert_isolated(acme, "acme")


@pytest.mark.security
def test_error_in_transaction_then_rollback(acme: Conn, tenant_db: TenantDb) -> None:
    expected = tenant_db.snapshot("acme")["orders"]
    acme.execute("BEGIN")
    assert acme.execute("SELECT * FROM orders ORDER BY id").fetchall() == expected
    with pytest.raises(errors.DivisionByZero):
        acme.execute("SELECT 1/0")
    with pytest.raises(errors.InFailedSqlTransaction):
        acme.execute("SELECT * FROM orders")
    acme.execute("ROLLBACK")
    assert acme.execute("SELECT * FROM orders ORDER BY id").fetchall() == expected
    # The same in one string: the error skips the rest, the next string starts afresh.
    with pytest.raises(errors.DivisionByZero):
        acme.execute("BEGIN; SELECT * FROM orders; SELECT 1/0; SELECT * FROM orders; COMMIT")
    acme.execute("ROLLBACK")
    assert acme.execute("SELECT * FROM orders ORDER BY id").fetchall() == expected
    assert_isolated(acme, "acme")


@pytest.mark.security
def test_pipeline_with_error_in_the_middle(acme: Conn, tenant_db: TenantDb) -> None:
    expected = tenant_db.snapshot("acme")["orders"]
    query = "SELECT * FROM orders WHERE id > %s ORDER BY id"
    cursors: list[psycopg.Cursor[tuple[Any, ...]]] = []

    def pipeline_with_error() -> None:
        with acme.pipeline() as pipeline:
            cursors.append(acme.execute(query, (0,)))
            pipeline.sync()
            acme.execute("SELECT 1/%s", (0,))  # fails at Execute
            acme.execute(query, (0,))  # skipped by the server until the next Sync
            acme.execute("SELECT set_config('app.tenant_id', %s, false)", ("globex",))
            pipeline.sync()

    with pytest.raises(errors.DivisionByZero):
        pipeline_with_error()
    assert cursors[0].fetchall() == expected
    with acme.pipeline() as pipeline:
        again = acme.execute(query, (0,))
        pipeline.sync()
        plain = acme.execute("SELECT * FROM orders ORDER BY id")
    assert again.fetchall() == expected
    assert plain.fetchall() == expected
    assert_isolated(acme, "acme")


@pytest.mark.security
async def test_asyncpg_reads(proxy: RunningProxy, tenant_db: TenantDb) -> None:
    expected = tenant_db.snapshot("globex")["orders"]
    user = tenant_db.user("globex")
    conn = await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user=user.name,
        password=user.password,
        database="app",
        ssl=False,
    )
    try:
        rows = await conn.fetch("SELECT * FROM orders ORDER BY id")
        assert [tuple(r) for r in rows] == expected
        rows = await conn.fetch("SELECT * FROM orders WHERE id > $1 ORDER BY id", 0)
        assert [tuple(r) for r in rows] == expected
        statement = await conn.prepare("SELECT tenant_id, secret FROM orders WHERE amount >= $1")
        for _ in range(3):
            fetched = await statement.fetch(0)
            assert len(fetched) == ORDERS_PER_TENANT
            assert {r["tenant_id"] for r in fetched} == {"globex"}
        async with conn.transaction():
            assert len(await conn.fetch("SELECT * FROM customers")) == CUSTOMERS_PER_TENANT
            # Portal suspension: Execute with max_rows=2, then more Executes of the portal.
            cursor_rows = [
                tuple(r) async for r in conn.cursor("SELECT * FROM orders ORDER BY id", prefetch=2)
            ]
            assert cursor_rows == expected
            cursor = await conn.cursor("SELECT tenant_id FROM billing.invoices ORDER BY id")
            assert {r[0] for r in await cursor.fetch(1)} == {"globex"}
            assert {r[0] for r in await cursor.fetch(5)} == {"globex"}
        async with conn.transaction():
            async with conn.transaction():  # savepoint
                await conn.fetch("SELECT * FROM orders")
            with pytest.raises(asyncpg.DivisionByZeroError):
                async with conn.transaction():
                    await conn.fetch("SELECT 1/$1::int", 0)
            assert [
                tuple(r) for r in await conn.fetch("SELECT * FROM orders ORDER BY id")
            ] == expected
        assert await conn.fetchval("SELECT current_setting('app.tenant_id', true)") == "globex"
    finally:
        await conn.close()


PSQL = shutil.which("psql")


def run_psql(
    proxy: RunningProxy, tenant_db: TenantDb, tenant: str, sql: str
) -> subprocess.CompletedProcess[str]:
    assert PSQL is not None
    user = tenant_db.user(tenant)
    return subprocess.run(
        [
            PSQL,
            "-X",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            proxy.host,
            "-p",
            str(proxy.port),
            "-U",
            user.name,
            "-d",
            "app",
            "-c",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PGPASSWORD": user.password, "PGSSLMODE": "disable"},
        check=False,
    )


@pytest.mark.security
@pytest.mark.skipif(PSQL is None, reason="psql not installed")
def test_psql_multi_statement_with_commit_inside(proxy: RunningProxy, tenant_db: TenantDb) -> None:
    result = run_psql(
        proxy,
        tenant_db,
        "initech",
        "BEGIN; SELECT tenant_id, secret FROM orders; COMMIT;"
        " SELECT tenant_id, name FROM customers; SELECT tenant_id FROM billing.invoices",
    )
    assert result.returncode == 0, result.stderr
    lines = [
        line for line in result.stdout.splitlines() if line and line not in ("BEGIN", "COMMIT")
    ]
    assert len(lines) == ORDERS_PER_TENANT + CUSTOMERS_PER_TENANT + INVOICES_PER_TENANT
    assert {line.split("|")[0] for line in lines} == {"initech"}


@pytest.mark.security
@pytest.mark.skipif(PSQL is None, reason="psql not installed")
def test_psql_writes(proxy: RunningProxy, clean_tenant_db: TenantDb) -> None:
    before = others_unchanged(clean_tenant_db, "acme")
    result = run_psql(
        proxy,
        clean_tenant_db,
        "acme",
        "BEGIN; UPDATE orders SET amount = 0; COMMIT; DELETE FROM customers;"
        " SELECT count(*) FROM orders",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "BEGIN",
        "UPDATE",
        str(ORDERS_PER_TENANT),
        "COMMIT",
        "DELETE",
        str(CUSTOMERS_PER_TENANT),
        str(ORDERS_PER_TENANT),
    ]
    assert others_unchanged(clean_tenant_db, "acme") == before


# --- writes: only the caller's rows ------------------------------------------------------


@pytest.mark.security
def test_writes_without_predicates_touch_only_own_rows(
    proxy: RunningProxy, clean_tenant_db: TenantDb
) -> None:
    before = others_unchanged(clean_tenant_db, "acme")
    with connect(proxy, clean_tenant_db, "acme") as conn:
        assert conn.execute("UPDATE orders SET amount = 0").rowcount == ORDERS_PER_TENANT
        assert conn.execute("UPDATE orders SET item = %s", ("x",)).rowcount == ORDERS_PER_TENANT
        assert conn.execute("DELETE FROM billing.invoices").rowcount == INVOICES_PER_TENANT
        with conn.pipeline():
            deleted = conn.execute("DELETE FROM customers WHERE id > %s", (0,))
        assert deleted.rowcount == CUSTOMERS_PER_TENANT
        inserted = conn.execute(
            "INSERT INTO orders (tenant_id, item) VALUES ('acme', 'new') RETURNING tenant_id"
        ).fetchall()
        assert inserted == [("acme",)]
        conn.execute("INSERT INTO orders (tenant_id, item) VALUES (%s, %s)", ("acme", "new2"))
        conn.execute(
            "INSERT INTO customers (tenant_id, name)"
            " VALUES (current_setting('app.tenant_id'), 'via setting')"
        )
    assert others_unchanged(clean_tenant_db, "acme") == before
    mine = clean_tenant_db.snapshot("acme")
    assert len(mine["orders"]) == ORDERS_PER_TENANT + 2
    assert [row[1] for row in mine["customers"]] == ["acme"]
    assert mine["billing.invoices"] == []


FOREIGN_WRITES = [
    "INSERT INTO orders (tenant_id, item) VALUES ('globex', 'planted')",
    "INSERT INTO orders (tenant_id, item) SELECT 'globex', item FROM orders",
    "UPDATE orders SET tenant_id = 'globex'",
    "UPDATE customers SET tenant_id = 'initech' WHERE id = (SELECT min(id) FROM customers)",
    "INSERT INTO billing.invoices (tenant_id, total) VALUES ('', 1)",
]


@pytest.mark.security
@pytest.mark.parametrize("statement", FOREIGN_WRITES)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_foreign_tenant_writes_are_refused(
    acme: Conn, clean_tenant_db: TenantDb, statement: str, protocol: str
) -> None:
    before = {t: clean_tenant_db.snapshot(t) for t in TENANTS}
    with pytest.raises(errors.InsufficientPrivilege, match=RLS_REFUSED):
        run(acme, statement, protocol)
    if protocol == "in_transaction":
        acme.execute("ROLLBACK")
    assert {t: clean_tenant_db.snapshot(t) for t in TENANTS} == before
    assert_isolated(acme, "acme")


@pytest.mark.security
async def test_asyncpg_writes(proxy: RunningProxy, clean_tenant_db: TenantDb) -> None:
    before = others_unchanged(clean_tenant_db, "initech")
    user = clean_tenant_db.user("initech")
    conn = await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user=user.name,
        password=user.password,
        database="app",
        ssl=False,
    )
    try:
        insert = "INSERT INTO orders (tenant_id, item) VALUES ($1, $2)"
        await conn.executemany(insert, [("initech", f"bulk-{i}") for i in range(10)])
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=RLS_REFUSED):
            await conn.executemany(insert, [("initech", "ok"), ("globex", "planted")])
        async with conn.transaction():
            assert await conn.fetchval("SELECT count(*) FROM orders") == ORDERS_PER_TENANT + 10
            status = await conn.execute("UPDATE orders SET amount = 1")
            assert status == f"UPDATE {ORDERS_PER_TENANT + 10}"
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match=RLS_REFUSED):
            await conn.execute("UPDATE orders SET tenant_id = $1", "globex")
    finally:
        await conn.close()
    assert others_unchanged(clean_tenant_db, "initech") == before
    items = [row[2] for row in clean_tenant_db.snapshot("initech")["orders"]]
    assert sorted(i for i in items if i.startswith("bulk-")) == sorted(
        f"bulk-{i}" for i in range(10)
    )
    assert "ok" not in items


# --- the tenant setting ----------------------------------------------------------------------


@pytest.mark.security
def test_setting_inside_statements_and_fail_closed_directly(
    acme: Conn, tenant_db: TenantDb
) -> None:
    for _ in range(2):
        assert acme.execute("SELECT current_setting('app.tenant_id', true)").fetchone() == ("acme",)
        assert acme.execute(
            "SELECT current_setting('app.tenant_id', true) WHERE %s", (True,)
        ).fetchone() == ("acme",)
    with psycopg.connect(tenant_db.app_dsn, autocommit=True) as direct:
        assert direct.execute("SELECT current_setting('app.tenant_id', true)").fetchone() == (None,)
        for table in SCOPED:
            assert direct.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)


# --- GUC tampering: every vector fails -----------------------------------------------------

TAMPERING = [
    "SET app.tenant_id = 'globex'",
    "SET SESSION app.tenant_id TO 'globex'",
    "SET LOCAL app.tenant_id = 'globex'",
    "SET app.tenant_id = DEFAULT",
    "RESET app.tenant_id",
    "SELECT set_config('app.tenant_id', 'globex', false)",
    "SELECT set_config('app.tenant_id', 'globex', true), tenant_id FROM orders",
    "SELECT pg_catalog.set_config('app.tenant_id', 'globex', true)",
    "SELECT * FROM orders, set_config(chr(97) || 'pp.tenant_id', 'globex', true) s",
    "SELECT set_config(lower('APP.TENANT_ID'), 'globex', false)",
    "UPDATE pg_settings SET setting = 'globex' WHERE name = 'app.tenant_id'",
    "DO $$ BEGIN PERFORM set_config('app.tenant_id', 'globex', false); END $$",
    "RESET ALL",
    "SET ROLE app_owner",
    "SELECT set_config('role', 'app_owner', false)",
    "SET SESSION AUTHORIZATION app_owner",
    "SET row_security = off",
    "ALTER ROLE CURRENT_USER SET app.tenant_id = 'globex'",
    "ALTER ROLE app_tenant SET app.tenant_id = 'globex'",
    "ALTER DATABASE app SET app.tenant_id = 'globex'",
    "DISCARD ALL",
    "PREPARE q AS SELECT * FROM orders",
    "EXECUTE q",
    "CREATE FUNCTION public.t() RETURNS text LANGUAGE sql"
    " AS $$ SELECT set_config('app.tenant_id', 'globex', false) $$",
]


@pytest.mark.security
@pytest.mark.parametrize("statement", TAMPERING)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tampering_statement_fails(
    acme: Conn, tenant_db: TenantDb, statement: str, protocol: str
) -> None:
    with pytest.raises(psycopg.Error) as raised:
        run(acme, statement, protocol)
    assert raised.value.sqlstate == "42501", raised.value
    assert "tenantgate" in str(raised.value)
    if protocol == "in_transaction":
        acme.execute("ROLLBACK")
    assert_isolated(acme, "acme")
    with tenant_db.connect() as su:
        assert su.execute("SELECT count(*) FROM pg_db_role_setting").fetchone() == (0,)
        assert su.execute("SELECT count(*) FROM pg_proc WHERE proname = 't'").fetchone() == (0,)


@pytest.mark.security
@pytest.mark.parametrize(
    "statements",
    [
        "BEGIN; SET LOCAL app.tenant_id = 'globex'; SELECT tenant_id FROM orders; COMMIT",
        "SET LOCAL app.tenant_id = 'globex'; SELECT tenant_id FROM orders",
        "SELECT tenant_id FROM orders; SET app.tenant_id = 'globex'",
        "COMMIT; SET app.tenant_id = 'globex'; SELECT tenant_id FROM orders",
    ],
)
def test_tampering_inside_multi_statement_strings(acme: Conn, statements: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege, match="tenantgate"):
        acme.execute(statements)
    acme.execute("ROLLBACK")  # harmless warning when no transaction is open
    assert_isolated(acme, "acme")


@pytest.mark.security
def test_rollback_to_savepoint_cannot_drop_the_tenant(acme: Conn) -> None:
    """A ROLLBACK TO reverts the set_config injected after its SAVEPOINT: re-injected."""
    for protocol in ("simple", "extended"):
        if protocol == "simple":
            acme.execute("BEGIN")
            acme.execute("SAVEPOINT a")
            acme.execute("SELECT 1")
            acme.execute("ROLLBACK TO SAVEPOINT a")
            rows = acme.execute("SELECT tenant_id FROM orders").fetchall()
            acme.execute("COMMIT")
        else:
            with acme.pipeline():
                acme.execute("BEGIN", prepare=True)
                acme.execute("SAVEPOINT a", prepare=True)
                acme.execute("SELECT %s::int", (1,))
                acme.execute("ROLLBACK TO SAVEPOINT a", prepare=True)
                cur = acme.execute("SELECT tenant_id FROM orders WHERE id > %s", (0,))
                acme.execute("COMMIT", prepare=True)
            rows = cur.fetchall()
        assert len(rows) == ORDERS_PER_TENANT, protocol
        assert_only(rows, "acme")


@pytest.mark.security
def test_function_call_message_is_refused(proxy: RunningProxy, tenant_db: TenantDb) -> None:
    user = tenant_db.user("acme")
    with RawClient(proxy.host, proxy.port) as client:
        client.login(user.name, user.password)
        client.send(function_call(SET_CONFIG_OID, [b"app.tenant_id", b"globex", b"f"]))
        reply = client.read_until_ready()
        assert [kind for kind, _ in reply] == [b"E", b"Z"]
        assert error_fields(reply[0][1])["C"] == "42501"
        rows = rows_of(client.simple("SELECT tenant_id FROM orders"))
        assert len(rows) == ORDERS_PER_TENANT
        assert {row[0] for row in rows} == {"acme"}
        assert rows_of(client.simple("SELECT current_setting('app.tenant_id', true)")) == [["acme"]]


@pytest.mark.security
@pytest.mark.parametrize(
    "extra",
    [
        {"app.tenant_id": "globex"},
        {"options": "-c app.tenant_id=globex"},
        {"options": "-c role=app_owner"},
        {"options": "-c row_security=off"},
        {"options": "--app.tenant_id=globex"},
        {"App.Tenant_Id": "globex"},
    ],
)
def test_startup_parameters_cannot_set_the_tenant(
    proxy: RunningProxy, tenant_db: TenantDb, extra: dict[str, str]
) -> None:
    user = tenant_db.user("acme")
    with RawClient(proxy.host, proxy.port) as client:
        try:
            client.login(user.name, user.password, extra=extra)
        except ServerError:
            return  # refused at startup: fine
        rows = rows_of(client.simple("SELECT tenant_id FROM orders"))
        assert len(rows) == ORDERS_PER_TENANT
        assert {row[0] for row in rows} == {"acme"}
        assert rows_of(client.simple("SHOW app.tenant_id")) in ([["acme"]], [])


@pytest.mark.security
@pytest.mark.parametrize(
    "options", ["-c app.tenant_id=globex", "-c role=app_owner", "-c row_security=off"]
)
def test_libpq_options_cannot_set_the_tenant(
    proxy: RunningProxy, tenant_db: TenantDb, options: str
) -> None:
    try:
        conn = connect(proxy, tenant_db, "acme", options=options)
    except psycopg.OperationalError:
        return  # refused at startup: fine
    with conn:
        assert_isolated(conn, "acme")
        assert conn.execute("SELECT current_user").fetchone() == (tenant_db.app_user,)


# --- both mode: predicates are still enforced, and RLS is there too ----------------------------


@pytest.mark.security
def test_both_mode_predicates_and_rls(both_proxy: RunningProxy, tenant_db: TenantDb) -> None:
    expected = tenant_db.snapshot("globex")["orders"]
    with connect(both_proxy, tenant_db, "globex") as conn:
        query = "SELECT * FROM orders WHERE tenant_id = 'globex' ORDER BY id"
        assert conn.execute(query).fetchall() == expected
        assert (
            conn.execute(
                "SELECT * FROM orders WHERE tenant_id = %s ORDER BY id", ("globex",)
            ).fetchall()
            == expected
        )
        with conn.pipeline():
            cur = conn.execute("SELECT * FROM orders WHERE tenant_id = %s ORDER BY id", ("globex",))
        assert cur.fetchall() == expected
        setting = "SELECT current_setting('app.tenant_id', true)"
        assert conn.execute(setting).fetchone() == ("globex",)
        with pytest.raises(errors.InsufficientPrivilege, match="tenantgate"):
            conn.execute("SELECT * FROM orders")  # no predicate: enforce refuses it
        with pytest.raises(errors.InsufficientPrivilege, match="tenantgate"):
            conn.execute("SET app.tenant_id = 'acme'")
        assert conn.execute(query).fetchall() == expected


# --- psycopg housekeeping ---------------------------------------------------------------
AUTO_PREPARED = "SELECT tenant_id FROM orders WHERE id > %s"


def auto_prepare(conn: Conn) -> None:
    for _ in range(6):  # from the 6th run on psycopg uses a server-side prepared statement
        conn.execute(AUTO_PREPARED, (0,)).fetchall()


def fail_in_transaction(conn: Conn) -> None:
    with conn.transaction():
        conn.execute("SELECT 1/0")


def test_rollback_after_auto_prepared_statements(proxy: RunningProxy, tenant_db: TenantDb) -> None:
    with connect(proxy, tenant_db, "acme", autocommit=False) as conn:
        auto_prepare(conn)
        with pytest.raises(errors.DivisionByZero):
            conn.execute("SELECT 1/0")
        conn.rollback()
        rows = conn.execute(AUTO_PREPARED, (0,)).fetchall()
    assert len(rows) == ORDERS_PER_TENANT
    assert_only(rows, "acme")


def test_savepoint_rollback_after_auto_prepared_statements(acme: Conn) -> None:
    auto_prepare(acme)
    with acme.transaction():
        with pytest.raises(errors.DivisionByZero):
            fail_in_transaction(acme)  # a savepoint, rolled back
        rows = acme.execute(AUTO_PREPARED, (0,)).fetchall()
    assert len(rows) == ORDERS_PER_TENANT
    assert_only(rows, "acme")


# --- the steady-state lane inside transaction blocks -----------------------------------------


def lane_served(proxy: RunningProxy, backend_pid: int) -> int | None:
    """Statements the lane of the session with this (proxy) backend pid answered.

    None: the session has no lane, because this build has none or because the
    session has not attached it yet (it does so when it starts running, which can
    be just after the client has its ReadyForQuery).
    """
    lane = proxy.app.server.sessions[backend_pid]._lane
    return None if lane is None else lane.served


def assert_lane_took_part(before: int, after: int | None) -> None:
    """The session's lane answered some of the statements since ``before``
    (compiled build), or this build has none (pure Python, or TENANTGATE_LANE=0)."""
    if lane_class() is None:
        assert after is None
    else:
        assert after is not None
        assert after > before


@pytest.mark.security
@pytest.mark.parametrize("mode", ["rls", "both"])
def test_prepared_statements_in_a_block_keep_the_tenant(
    mode: str, proxy: RunningProxy, both_proxy: RunningProxy, tenant_db: TenantDb
) -> None:
    """Inside a block whose tenant is set, prepared statements may take the lane
    (compiled build); a SAVEPOINT, a ROLLBACK TO (which reverts the set_config made
    after its SAVEPOINT) and an error each send the next statement the Python way,
    which sets the tenant again: every read sees exactly the tenant's rows."""
    running = proxy if mode == "rls" else both_proxy
    query = (
        "SELECT * FROM orders WHERE tenant_id = %s AND id > %s ORDER BY id"
        if mode == "both"
        else "SELECT * FROM orders WHERE id > %s AND %s::text IS NOT NULL ORDER BY id"
    )
    params = ("acme", 0) if mode == "both" else (0, "x")
    expected = tenant_db.snapshot("acme")["orders"]
    with connect(running, tenant_db, "acme", autocommit=False) as conn:
        pid = conn.info.backend_pid
        before = lane_served(running, pid) or 0  # a lane not attached yet served none
        for _ in range(2):
            for _ in range(4):
                assert conn.execute(query, params, prepare=True).fetchall() == expected
            conn.execute("SAVEPOINT a")
            assert conn.execute(query, params, prepare=True).fetchall() == expected
            conn.execute("ROLLBACK TO SAVEPOINT a")
            for _ in range(3):
                assert conn.execute(query, params, prepare=True).fetchall() == expected
            with pytest.raises(errors.DivisionByZero):
                conn.execute("SELECT 1/0")
            conn.rollback()
            assert conn.execute(query, params, prepare=True).fetchall() == expected
            conn.commit()
        after = lane_served(running, pid)
    assert_lane_took_part(before, after)


@pytest.mark.security
def test_new_inlined_texts_in_a_block_keep_the_tenant(
    both_proxy: RunningProxy, tenant_db: TenantDb
) -> None:
    """both mode with pgbench's simple protocol (W3): every statement a new text,
    its values inlined.  Inside a block whose tenant is set, texts of a known shape
    may take the lane (compiled build), which checks each text's tenant literal by
    its bytes: every read sees exactly the tenant's rows, every write touches only
    them, and a literal of another tenant (of the same length) is refused."""
    mine = tenant_db.snapshot("acme")["orders"]
    others = [row[0] for row in tenant_db.snapshot("globex")["orders"]]
    read = "SELECT id, tenant_id, item FROM orders WHERE tenant_id = {} AND id = {}"
    write = "UPDATE orders SET amount = amount + {} WHERE tenant_id = 'acme' AND id = {}"
    with connect(
        both_proxy, tenant_db, "acme", autocommit=False, cursor_factory=psycopg.ClientCursor
    ) as conn:
        pid = conn.info.backend_pid
        before = lane_served(both_proxy, pid) or 0
        for round_ in range(3):
            for row in mine:
                got = conn.execute(read.format("'acme'", row[0])).fetchall()
                assert got == [(row[0], "acme", row[2])]
                assert conn.execute(write.format(round_ * 7 - 5, row[0])).rowcount == 1
            for other in others:
                assert conn.execute(read.format("'acme'", other)).fetchall() == []
                assert conn.execute(write.format(3, other)).rowcount == 0
            conn.rollback()  # the writes are undone: the seed data stays as it was
        for other in others[:2]:
            with pytest.raises(errors.InsufficientPrivilege, match="wrong_tenant"):
                conn.execute(read.format("'acmf'", other))
            conn.rollback()
        after = lane_served(both_proxy, pid)
    assert tenant_db.snapshot("acme")["orders"] == mine
    assert_lane_took_part(before, after)


@pytest.mark.security
def test_the_tenant_goes_in_front_of_new_inlined_texts_wherever_it_is_due(
    both_proxy: RunningProxy, tenant_db: TenantDb
) -> None:
    """both mode with W3's short transactions and with autocommit statements: the
    block's first statement and every statement outside a block need the tenant
    set in front of them, which the lane does for texts of a known shape (compiled
    build) as the Python path does.  If the tenant were not set, fail-closed RLS
    would show nothing.  Every read sees exactly its row, every write touches only
    the tenant's rows, and BEGIN/ROLLBACK (transaction control by their bytes)
    leave nothing behind.  Outside a block the lane can take a statement only by
    splicing the tenant in, so its count going up there shows it did."""
    mine = tenant_db.snapshot("acme")["orders"]
    others = [row[0] for row in tenant_db.snapshot("globex")["orders"]]
    read = "SELECT id, tenant_id, item FROM orders WHERE tenant_id = 'acme' AND id = {}"
    write = "UPDATE orders SET amount = amount + {} WHERE tenant_id = 'acme' AND id = {}"
    kw: dict[str, Any] = {"cursor_factory": psycopg.ClientCursor}
    with connect(both_proxy, tenant_db, "acme", autocommit=False, **kw) as conn:
        for round_ in range(4):  # one block per statement pair: BEGIN, read, write, ROLLBACK
            for row in mine:
                assert conn.execute(read.format(row[0])).fetchall() == [(row[0], "acme", row[2])]
                assert conn.execute(write.format(round_ + 1, row[0])).rowcount == 1
                conn.rollback()
            for other in others:
                assert conn.execute(read.format(other)).fetchall() == []
                assert conn.execute(write.format(1, other)).rowcount == 0
                conn.rollback()
    # Texts this session has not seen (the lane learns a shape from its own session).
    read = read + " AND amount > {}"
    with connect(both_proxy, tenant_db, "acme", autocommit=True, **kw) as conn:
        pid = conn.info.backend_pid
        for round_ in range(3):
            for row in mine:
                got = conn.execute(read.format(row[0], -1000000 - round_)).fetchall()
                assert got == [(row[0], "acme", row[2])]
            if round_ == 0:  # the shape is known now: the lane may take the rest
                before = lane_served(both_proxy, pid) or 0
            for other in others:
                assert conn.execute(read.format(other, -1000000 - round_)).fetchall() == []
        assert conn.execute(write.format(0, mine[0][0])).rowcount == 1  # autocommit, no change
        after = lane_served(both_proxy, pid)
    assert tenant_db.snapshot("acme")["orders"] == mine
    assert_lane_took_part(before, after)
