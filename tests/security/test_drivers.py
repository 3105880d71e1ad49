"""Rejections as real drivers see them, and Bind-time checks, in both and enforce mode.

``enforce`` runs against an upstream role with BYPASSRLS (see conftest): there a
missed check would hand out globex's rows, so every "no leak" assertion is
meaningful.  ``both`` adds RLS behind the analyser.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

import asyncpg
import pg8000.native
import psycopg
import pytest
from psycopg import errors, pq
from security_support import (
    TENANT,
    LibpqClient,
    RawClient,
    errors_of,
    leaks,
    rows_of,
    texts_of,
)

from support.db import ORDERS_PER_TENANT, TenantDb
from support.proxy import RunningProxy
from tenantgate.protocol.frontend import Bind, Close, Describe, Execute, Parse, Sync

pytestmark = [pytest.mark.security]

BY_TENANT = "SELECT id, tenant_id, secret FROM orders WHERE tenant_id = {} ORDER BY id"
HIDDEN_TEXT = "SELECT id FROM orders WHERE tenant_id = 'acme'"


@pytest.fixture(params=["both", "enforce"])
def proxy(request: pytest.FixtureRequest) -> RunningProxy:
    return request.getfixturevalue(f"proxy_{request.param}")  # type: ignore[no-any-return]


@pytest.fixture
def login(security_db: TenantDb) -> tuple[str, str]:
    user = security_db.user(TENANT)
    return user.name, user.password


@pytest.fixture
def conn(proxy: RunningProxy, login: tuple[str, str]) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(proxy.dsn(*login), autocommit=True) as connection:
        yield connection


def assert_rejection(exc: BaseException) -> None:
    assert isinstance(exc, errors.InsufficientPrivilege), exc
    diag = exc.diag
    assert diag.sqlstate == "42501"
    assert (diag.message_primary or "").startswith("tenantgate:"), diag.message_primary
    assert diag.message_hint, "a rejection carries a HINT"
    text = " ".join(str(v) for v in (diag.message_primary, diag.message_detail, diag.message_hint))
    assert not leaks(text, "globex")


def assert_acme_rows(rows: list[Any]) -> None:
    assert len(rows) == ORDERS_PER_TENANT
    assert {row[1] for row in rows} == {TENANT}


# --- psycopg ---------------------------------------------------------------------------

Statements = list[tuple[str, list[Any] | None]]


def _transaction(conn: psycopg.Connection[Any], statements: Statements) -> None:
    with conn.transaction():
        for query, params in statements:
            conn.execute(query, params)


def _pipeline(
    conn: psycopg.Connection[Any], statements: Statements, cursors: list[psycopg.Cursor[Any]]
) -> None:
    with conn.pipeline():
        for query, params in statements:
            cursors.append(conn.execute(query, params))


def test_psycopg_simple_rejection_then_usable(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(errors.InsufficientPrivilege) as info:
        conn.execute("SELECT id, tenant_id, secret FROM orders")  # no params: simple Query
    assert_rejection(info.value)
    assert conn.execute("SELECT 1").fetchone() == (1,)
    assert_acme_rows(conn.execute(BY_TENANT.format("'acme'")).fetchall())


def test_psycopg_multi_statement_string_rejected_as_a_whole(
    conn: psycopg.Connection[Any], security_db: TenantDb
) -> None:
    before = security_db.snapshot_all()
    with pytest.raises(errors.InsufficientPrivilege) as info:
        conn.execute("UPDATE orders SET item = 'x' WHERE tenant_id = 'acme'; DELETE FROM orders")
    assert_rejection(info.value)
    assert security_db.snapshot_all() == before  # not even the first statement ran
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_extended_wrong_tenant_param(conn: psycopg.Connection[Any]) -> None:
    with pytest.raises(errors.InsufficientPrivilege) as info:
        conn.execute(BY_TENANT.format("%s"), ["globex"])
    assert_rejection(info.value)
    assert_acme_rows(conn.execute(BY_TENANT.format("%s"), ["acme"]).fetchall())


def test_psycopg_binary_params(conn: psycopg.Connection[Any]) -> None:
    query = BY_TENANT.format("%b")
    with pytest.raises(errors.InsufficientPrivilege) as info:
        conn.execute(query, ["globex"])
    assert_rejection(info.value)
    assert_acme_rows(conn.execute(query, ["acme"]).fetchall())


def test_psycopg_prepared_statement_rebound_to_other_tenant(conn: psycopg.Connection[Any]) -> None:
    """A named statement executed with acme, then (Bind only) with globex: rejected."""
    query = BY_TENANT.format("%s")
    assert_acme_rows(conn.execute(query, ["acme"], prepare=True).fetchall())
    with pytest.raises(errors.InsufficientPrivilege) as info:
        conn.execute(query, ["globex"], prepare=True)
    assert_rejection(info.value)
    assert_acme_rows(conn.execute(query, ["acme"], prepare=True).fetchall())


def test_psycopg_transaction_after_rejection(conn: psycopg.Connection[Any]) -> None:
    """Inside a transaction a rejection aborts it like a server error; ROLLBACK recovers."""
    with pytest.raises(errors.InsufficientPrivilege):
        _transaction(conn, [(BY_TENANT.format("%s"), ["acme"]), ("SELECT * FROM orders", None)])
    assert conn.pgconn.transaction_status == pq.TransactionStatus.IDLE
    assert_acme_rows(conn.execute(BY_TENANT.format("%s"), ["acme"]).fetchall())


def test_libpq_pipeline_rejection_skips_until_sync(
    proxy: RunningProxy, login: tuple[str, str], clean_tenant_db: TenantDb
) -> None:
    """libpq pipeline mode: ok, rejected, (skipped) write, Sync -> the driver's view."""
    marker = "pipeline-skipped"
    insert = "INSERT INTO orders (tenant_id, item) VALUES ($1, $2)"
    with LibpqClient(proxy.dsn(*login)) as client:
        results = client.pipeline(
            [
                (BY_TENANT.format("$1"), ["acme"]),
                (BY_TENANT.format("$1"), ["globex"]),
                (insert, ["acme", marker]),
            ]
        )
        statuses = [status for status, _, _ in results]
        assert statuses == [
            pq.ExecStatus.TUPLES_OK,
            pq.ExecStatus.FATAL_ERROR,
            pq.ExecStatus.PIPELINE_ABORTED,
            pq.ExecStatus.PIPELINE_SYNC,
        ], results
        assert_acme_rows(results[0][2])
        error = results[1][1]
        assert error["C"] == "42501"
        assert error["M"].startswith("tenantgate:")
        assert error.get("H")
        # In sync: the next pipeline and a plain statement work.
        again = client.pipeline([(BY_TENANT.format("$1"), ["acme"]), (insert, ["acme", "ok"])])
        assert [s for s, _, _ in again] == [
            pq.ExecStatus.TUPLES_OK,
            pq.ExecStatus.COMMAND_OK,
            pq.ExecStatus.PIPELINE_SYNC,
        ], again
        assert client.usable()
    items = [row[2] for row in clean_tenant_db.snapshot(TENANT)["orders"]]
    assert marker not in items
    assert "ok" in items


# psycopg reads results opportunistically while a pipeline block is still sending; if an
# error arrives before the block's last execute(), psycopg itself may end up unable to
# leave pipeline mode (seen against the server directly too).  So the psycopg tests put
# the rejected statement last; "later statements are skipped until Sync" is checked
# deterministically at the libpq level above.


def test_psycopg_pipeline_rejection(conn: psycopg.Connection[Any]) -> None:
    query = BY_TENANT.format("%s")
    cursors: list[psycopg.Cursor[Any]] = []
    with pytest.raises(errors.InsufficientPrivilege) as info:
        _pipeline(conn, [(query, ["acme"]), (query, ["globex"])], cursors)
    assert_rejection(info.value)
    assert_acme_rows(cursors[0].fetchall())
    # The driver is still in sync: a second pipeline and plain statements work.
    with conn.pipeline():
        a = conn.execute(query, ["acme"])
        b = conn.execute(BY_TENANT.format("%s").replace("ORDER", "AND id > %s ORDER"), [TENANT, 0])
    assert_acme_rows(a.fetchall())
    assert_acme_rows(b.fetchall())
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_pipeline_rejected_parse(conn: psycopg.Connection[Any]) -> None:
    cursors: list[psycopg.Cursor[Any]] = []
    statements = [
        ("SELECT %s::int", [1]),
        ("SELECT id FROM orders WHERE tenant_id = %s OR true", ["acme"]),
    ]
    with pytest.raises(errors.InsufficientPrivilege) as info:
        _pipeline(conn, statements, cursors)
    assert_rejection(info.value)
    assert cursors[0].fetchone() == (1,)
    assert conn.execute("SELECT %s::int", [4]).fetchone() == (4,)


def test_unnamed_statement_after_tenant_param_statement(
    proxy: RunningProxy, login: tuple[str, str]
) -> None:
    with LibpqClient(proxy.dsn(*login)) as client:
        first = client.extended(BY_TENANT.format("$1"), ["acme"])
        assert first.error is None
        second = client.extended("SELECT $1::int", ["5"])
        assert second.error is None, second.error
        rollback = client.extended("ROLLBACK")  # what JDBC-style drivers send
        assert not rollback.rejected, rollback.error


def test_psycopg_pipeline_mixed_params(conn: psycopg.Connection[Any]) -> None:
    with conn.pipeline():
        a = conn.execute(BY_TENANT.format("%s"), ["acme"])
        b = conn.execute("SELECT %s::int", [5])
    assert_acme_rows(a.fetchall())
    assert b.fetchone() == (5,)


# --- asyncpg ---------------------------------------------------------------------------


async def test_asyncpg_prepared_statement_and_binary_params(
    proxy: RunningProxy, login: tuple[str, str]
) -> None:
    conn = await asyncpg.connect(proxy.url(*login))
    try:
        query = "SELECT id, tenant_id, secret FROM orders WHERE tenant_id = $1 AND id > $2"
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError) as info:
            await conn.fetch(query, "globex", 0)
        assert info.value.message.startswith("tenantgate:")
        assert info.value.hint
        assert not leaks(str(info.value.as_dict()), query, ["globex"])
        rows = await conn.fetch(query, TENANT, 0)
        assert_acme_rows([tuple(r) for r in rows])
        stmt = await conn.prepare(query)
        assert_acme_rows([tuple(r) for r in await stmt.fetch(TENANT, 0)])
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await stmt.fetch("globex", 0)
        with pytest.raises(asyncpg.exceptions.InsufficientPrivilegeError):
            await stmt.fetch("acme ", 0)
        assert_acme_rows([tuple(r) for r in await stmt.fetch(TENANT, 0)])
        async with conn.transaction():
            assert await conn.fetchval("SELECT count(*) FROM orders WHERE tenant_id = $1", TENANT)
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()


# --- pg8000 ----------------------------------------------------------------------------


def test_pg8000_rejection(proxy: RunningProxy, login: tuple[str, str]) -> None:
    user, password = login
    conn = pg8000.native.Connection(
        user, host=proxy.host, port=proxy.port, database="app", password=password
    )
    try:
        query = "SELECT id, tenant_id, secret FROM orders WHERE tenant_id = :t ORDER BY id"
        with pytest.raises(pg8000.native.DatabaseError) as info:
            conn.run(query, t="globex")
        fields = info.value.args[0]
        assert fields["C"] == "42501"
        assert fields["M"].startswith("tenantgate:")
        assert fields.get("H")
        assert_acme_rows(conn.run(query, t=TENANT))
        with pytest.raises(pg8000.native.DatabaseError) as info:
            conn.run("SELECT secret FROM orders")
        assert info.value.args[0]["C"] == "42501"
        assert conn.run("SELECT 1") == [[1]]
    finally:
        conn.close()


# --- psql ------------------------------------------------------------------------------


def _psql() -> str:
    found = shutil.which("psql")
    if found is None:
        pytest.skip("psql is not installed")
    return found


def test_psql_on_error_stop(proxy: RunningProxy, login: tuple[str, str]) -> None:
    user, password = login
    env = {**os.environ, "PGPASSWORD": password, "PGCONNECT_TIMEOUT": "10"}
    args = [_psql(), "-X", "-h", proxy.host, "-p", str(proxy.port), "-U", user, "-d", "app"]
    done = subprocess.run(
        [*args, "-v", "ON_ERROR_STOP=1", "-c", "SELECT secret FROM orders"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done
    assert "ERROR:  tenantgate:" in done.stderr
    assert "HINT:" in done.stderr
    assert not leaks(done.stdout + done.stderr, "SELECT secret FROM orders")
    script = (
        "SELECT 'before';\nSELECT secret FROM orders WHERE tenant_id = 'globex';\nSELECT 'after';\n"
    )
    done = subprocess.run(
        [*args, "-v", "ON_ERROR_STOP=1", "-At"],
        input=script,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 3, done  # psql: a script stopped by ON_ERROR_STOP
    assert "before" in done.stdout
    assert "after" not in done.stdout
    assert "tenantgate:" in done.stderr
    assert "globex-secret" not in done.stdout + done.stderr


# --- raw protocol: statement-name games ---------------------------------------------------


@pytest.fixture
def raw(proxy: RunningProxy, login: tuple[str, str]) -> Iterator[RawClient]:
    with RawClient(proxy.host, proxy.port) as client:
        client.login(*login, "app")
        yield client


def _no_leak(replies: list[tuple[bytes, bytes]]) -> None:
    rows = rows_of(replies)
    assert all(row[1] == TENANT for row in rows if len(row) > 1), rows
    assert not leaks("\n".join(texts_of(replies))), texts_of(replies)


def _usable(raw: RawClient) -> None:
    replies = raw.simple("SELECT 1")
    assert rows_of(replies) == [("1",)], replies
    assert replies[-1] == (b"Z", b"I")


def _exec(name: str, *params: bytes | None, formats: tuple[int, ...] = ()) -> bytes:
    return (
        Bind("", name, formats, params, ()).encode()
        + Describe("P", "").encode()
        + Execute("", 0).encode()
    )


def test_parse_name_reuse_in_one_pipeline(raw: RawClient) -> None:
    """Parse s1 (allowed, fails on the server); Parse s1 (tenant_id = $1); Bind s1 globex."""
    raw.send(
        Parse("s1", "SELECT id, tenant_id FROM orders WHERE tenant_id = 'acme' AND x = 1").encode(),
        Parse("s1", BY_TENANT.format("$1")).encode(),
        _exec("s1", b"globex"),
        Sync().encode(),
    )
    replies = raw.read_until_ready()
    _no_leak(replies)
    assert errors_of(replies), replies
    _usable(raw)


def test_parse_name_reuse_after_sync(raw: RawClient) -> None:
    raw.send(
        Parse("s1", "SELECT id FROM orders WHERE tenant_id = 'acme' AND nope = 1").encode(),
        Sync().encode(),
    )
    assert errors_of(raw.read_until_ready())
    raw.send(Parse("s1", BY_TENANT.format("$1")).encode(), _exec("s1", b"globex"), Sync().encode())
    replies = raw.read_until_ready()
    _no_leak(replies)
    errors_seen = errors_of(replies)
    assert errors_seen, replies
    assert errors_seen[0]["C"] == "42501", replies
    assert errors_seen[0]["M"].startswith("tenantgate:")
    raw.send(_exec("s1", b"acme"), Sync().encode())
    replies = raw.read_until_ready()
    assert len(rows_of(replies)) == ORDERS_PER_TENANT
    _no_leak(replies)
    _usable(raw)


def test_duplicate_parse_does_not_replace_checked_statement(raw: RawClient) -> None:
    """s1 = tenant_id = $1 exists; a second Parse s1 (no tenant param) fails on the server
    (duplicate name), so a Bind with globex still runs the first text: rejected."""
    raw.send(Parse("s1", BY_TENANT.format("$1")).encode(), Sync().encode())
    assert not errors_of(raw.read_until_ready())
    raw.send(
        Parse(
            "s1", "SELECT id, tenant_id FROM orders WHERE tenant_id = 'acme' AND $1::text <> ''"
        ).encode(),
        Sync().encode(),
    )
    assert errors_of(raw.read_until_ready())  # 42P05 duplicate prepared statement
    raw.send(_exec("s1", b"globex"), Sync().encode())
    replies = raw.read_until_ready()
    _no_leak(replies)
    assert errors_of(replies)[0]["C"] == "42501", replies
    _usable(raw)


def test_close_then_reparse_in_one_pipeline(raw: RawClient) -> None:
    raw.send(
        Parse(
            "s1", "SELECT id, tenant_id FROM orders WHERE tenant_id = 'acme' AND id > $1::int"
        ).encode(),
        Sync().encode(),
    )
    assert not errors_of(raw.read_until_ready())
    raw.send(
        Close("S", "s1").encode(),
        Parse("s1", BY_TENANT.format("$1")).encode(),
        _exec("s1", b"globex"),
        Sync().encode(),
    )
    replies = raw.read_until_ready()
    _no_leak(replies)
    assert errors_of(replies)[0]["C"] == "42501", replies
    _usable(raw)


@pytest.mark.parametrize(
    ("types", "value", "formats"),
    [
        ((19,), b"globex", ()),  # name
        ((1042,), b"acme", ()),  # bpchar: refused (padding), fail closed
        ((0,), b"globex", (1,)),  # binary, type inferred by the server
        ((25,), b"globex", (1,)),  # binary text
        ((1043,), b"globex", (1,)),  # binary varchar
        ((25,), b"acme\x00", (1,)),  # binary text with a NUL
        ((705,), b"globex", ()),  # unknown
        ((25,), None, ()),  # NULL
    ],
)
def test_declared_param_types(
    raw: RawClient, types: tuple[int, ...], value: bytes | None, formats: tuple[int, ...]
) -> None:
    raw.send(
        Parse("", BY_TENANT.format("$1"), types).encode(),
        _exec("", value, formats=formats),
        Sync().encode(),
    )
    replies = raw.read_until_ready()
    _no_leak(replies)
    assert errors_of(replies), replies
    _usable(raw)


@pytest.mark.parametrize(("types", "formats"), [((25,), (1,)), ((0,), (0,)), ((1043,), ())])
def test_declared_param_types_acme_allowed(
    raw: RawClient, types: tuple[int, ...], formats: tuple[int, ...]
) -> None:
    raw.send(
        Parse("", BY_TENANT.format("$1"), types).encode(),
        _exec("", b"acme", formats=formats),
        Sync().encode(),
    )
    replies = raw.read_until_ready()
    assert not errors_of(replies), replies
    assert len(rows_of(replies)) == ORDERS_PER_TENANT
    _no_leak(replies)


def test_reserved_statement_names(raw: RawClient) -> None:
    raw.send(
        Bind("", "__tenantgate_set_tenant", (0,), (b"app.tenant_id", b"globex"), ()).encode(),
        Execute("", 0).encode(),
        Sync().encode(),
    )
    replies = raw.read_until_ready()
    assert errors_of(replies)[0]["C"] == "42501", replies
    _usable(raw)
    replies = raw.simple("SELECT id, tenant_id FROM orders WHERE tenant_id = 'acme'")
    assert len(rows_of(replies)) == ORDERS_PER_TENANT
    _no_leak(replies)


# --- rls injection side effects on legitimate statements ----------------------------------


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_set_transaction_after_begin(
    proxy_both: RunningProxy, login: tuple[str, str], protocol: str
) -> None:
    with LibpqClient(proxy_both.dsn(*login)) as client:
        assert client.simple("BEGIN").error is None
        out = client.run("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None, protocol)
        client.simple("ROLLBACK")
        assert out.error is None, out.error
