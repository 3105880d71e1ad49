"""The per-statement fast paths (enforce mode) decide exactly what the general path decides.

A simple Query whose exact bytes were allowed before skips framing, decoding
and the analysis lookup (``Session._known_query``).  These tests send the
same texts again and again through a real proxy and a real server, with
psycopg's ClientCursor (simple protocol, literals inlined), and check that
repetition never changes a verdict: another tenant's literal stays refused,
a refused text stays refused, rate limits and metrics still apply, and
results are right.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors

from support.db import TenantDb
from support.proxy import RunningProxy

pytestmark = pytest.mark.postgres


def connect(proxy: RunningProxy, db: TenantDb, tenant: str) -> psycopg.Connection[Any]:
    user = db.user(tenant)
    return psycopg.connect(
        proxy.dsn(user.name, user.password), autocommit=True, cursor_factory=psycopg.ClientCursor
    )


def metric(port: int, name: str, labels: dict[str, str]) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        body = resp.read().decode()
    total = 0.0
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def enforce_policy(db: TenantDb, **overrides: Any) -> Any:
    """Enforce mode with an upstream role RLS does not restrict (the superuser), so the
    results show the proxy's isolation alone, as in an enforce-only deployment."""
    cluster = db.cluster
    upstream = {"user": cluster.superuser, "password": cluster.password}
    return db.policy("enforce", metrics_port=0, upstream=upstream, **overrides)


def assert_failed_transaction_recovers(
    conn: psycopg.Connection[Any], sql: str, *, prepare: bool
) -> None:
    """In a failed transaction the statement gets the server's error; after ROLLBACK
    it runs again (the fast path's tracker entries stayed in step)."""
    conn.execute("BEGIN")
    with pytest.raises(errors.DivisionByZero):
        conn.execute("SELECT 1/0")
    with pytest.raises(errors.InFailedSqlTransaction):
        conn.execute(sql, ("acme", 0), prepare=prepare)
    conn.execute("ROLLBACK")
    assert conn.execute(sql, ("acme", 0), prepare=prepare).fetchone() == (5, "acme")


@pytest.fixture
def enforce_proxy(clean_tenant_db: TenantDb) -> Iterator[RunningProxy]:
    running = RunningProxy(enforce_policy(clean_tenant_db))
    try:
        yield running
    finally:
        running.stop()


def test_repeated_texts_keep_their_verdicts(
    enforce_proxy: RunningProxy, clean_tenant_db: TenantDb
) -> None:
    db = clean_tenant_db
    mine = "SELECT count(*) FROM orders WHERE tenant_id = 'acme'"
    with connect(enforce_proxy, db, "acme") as acme, connect(enforce_proxy, db, "globex") as gx:
        counts = [acme.execute(mine).fetchone() for _ in range(5)]
        assert counts == [(5,)] * 5
        # The text acme ran (and the proxy remembered) names acme: refused for globex, each time.
        for _ in range(3):
            with pytest.raises(errors.InsufficientPrivilege, match="wrong_tenant"):
                gx.execute(mine)
        assert gx.execute("SELECT count(*) FROM orders WHERE tenant_id = 'globex'").fetchone() == (
            5,
        )
        # A refused text stays refused however often it comes.
        for _ in range(3):
            with pytest.raises(errors.InsufficientPrivilege, match="missing_tenant_predicate"):
                acme.execute("SELECT count(*) FROM orders")
        # Still the right answers after all that, and the session is in sync.
        assert acme.execute(mine).fetchone() == (5,)
        acme.execute("INSERT INTO orders (tenant_id, item) VALUES ('acme', 'fast')")
        assert acme.execute(mine).fetchone() == (6,)
    port = enforce_proxy.app.metrics_port
    assert port is not None
    stmts = "tenantgate_statements_total"
    assert metric(port, stmts, {"tenant": "acme", "command": "select", "outcome": "allowed"}) == 7
    assert metric(port, stmts, {"tenant": "acme", "outcome": "rejected"}) == 3
    assert metric(port, stmts, {"tenant": "globex", "outcome": "rejected"}) == 3
    assert metric(port, "tenantgate_rows_total", {"tenant": "acme"}) == 8  # 7 counts + 1 insert


def test_new_texts_of_a_known_shape(enforce_proxy: RunningProxy, clean_tenant_db: TenantDb) -> None:
    """W4: every text new (literals inlined); the text shape answers without a parse,
    with this text's own tenant value checked every time."""
    db = clean_tenant_db
    with connect(enforce_proxy, db, "acme") as acme, connect(enforce_proxy, db, "globex") as gx:
        ids = [r[0] for r in acme.execute("SELECT id FROM orders WHERE tenant_id = 'acme'")]
        for n, id_ in enumerate(ids):
            sql = f"SELECT item FROM orders WHERE tenant_id = 'acme' AND id = {id_} LIMIT {n + 1}"
            assert len(acme.execute(sql).fetchall()) == 1
            other = f"SELECT item FROM orders WHERE tenant_id = 'gbex' AND id = {id_} LIMIT {n + 1}"
            with pytest.raises(errors.InsufficientPrivilege, match="wrong_tenant"):
                acme.execute(other)
            with pytest.raises(errors.InsufficientPrivilege, match="wrong_tenant"):
                gx.execute(sql)  # the same text, from another tenant
            assert acme.execute("SELECT 1").fetchone() == (1,)  # in sync after each refusal
    assert enforce_proxy.app.cache.text_shapes.hits >= len(ids) - 1


def test_known_texts_still_pass_the_rate_limit(clean_tenant_db: TenantDb) -> None:
    running = RunningProxy(
        enforce_policy(
            clean_tenant_db,
            limits={"rate_limit_max_delay_ms": 100},
            tenants={"acme": {"limits": {"queries_per_second": 2}}},
        )
    )
    try:
        with connect(running, clean_tenant_db, "acme") as acme:
            acme.execute("SELECT 1")
            acme.execute("SELECT 1")  # the burst; "SELECT 1" is now a known text
            with pytest.raises(psycopg.Error) as info:
                acme.execute("SELECT 1")
            assert info.value.sqlstate == "53400"
            time.sleep(0.35)  # ~0.7 tokens: the next one waits ~150 ms > 100 ms bound
            with pytest.raises(psycopg.Error) as info:
                acme.execute("SELECT 1")
            assert info.value.sqlstate == "53400"
            time.sleep(0.6)
            start = time.monotonic()
            assert acme.execute("SELECT 1").fetchone() == (1,)
            assert time.monotonic() - start < 0.3
    finally:
        running.stop()


def test_known_text_in_a_failed_transaction(
    enforce_proxy: RunningProxy, clean_tenant_db: TenantDb
) -> None:
    with connect(enforce_proxy, clean_tenant_db, "acme") as acme:
        mine = "SELECT count(*) FROM orders WHERE tenant_id = 'acme'"
        assert acme.execute(mine).fetchone() == (5,)
        acme.execute("BEGIN")
        with pytest.raises(errors.DivisionByZero):
            acme.execute("SELECT 1/0")
        with pytest.raises(errors.InFailedSqlTransaction):
            acme.execute(mine)
        acme.execute("ROLLBACK")
        assert acme.execute(mine).fetchone() == (5,)
        assert acme.info.transaction_status == psycopg.pq.TransactionStatus.IDLE


@pytest.mark.parametrize("mode", ["both", "rls"])
def test_known_texts_get_the_tenant_injected(clean_tenant_db: TenantDb, mode: str) -> None:
    """rls/both: a repeated text still runs with the tenant set, in and out of blocks.

    The upstream role is under fail-closed RLS: a statement that ran without the
    tenant would see no rows, one that ran with another tenant's would see theirs.
    """
    running = RunningProxy(clean_tenant_db.policy(mode, metrics_port=0))
    mine = (
        "SELECT count(*), min(tenant_id) FROM orders WHERE tenant_id = 'acme'"
        if mode == "both"
        else "SELECT count(*), min(tenant_id) FROM orders"
    )
    try:
        with connect(running, clean_tenant_db, "acme") as acme:
            for _ in range(4):  # autocommit: injected before each one
                assert acme.execute(mine).fetchone() == (5, "acme")
            acme.execute("BEGIN")
            for _ in range(3):  # one block: injected once
                assert acme.execute(mine).fetchone() == (5, "acme")
            acme.execute("SAVEPOINT s")
            assert acme.execute(mine).fetchone() == (5, "acme")
            acme.execute("ROLLBACK TO SAVEPOINT s")  # may revert a set_config: injected again
            assert acme.execute(mine).fetchone() == (5, "acme")
            acme.execute("COMMIT")
            assert acme.execute(mine).fetchone() == (5, "acme")
            # An error position in a known text still points into the client's own text.
            bad = "SELECT count(*) FROM orders WHERE tenant_id = 'acme' AND 1/0 = 1"
            for _ in range(3):
                with pytest.raises(errors.DivisionByZero):
                    acme.execute(bad)
            assert acme.execute(mine).fetchone() == (5, "acme")
        port = running.app.metrics_port
        assert port is not None
        # Only the client's statements count; the injected set_config calls do not.
        allowed = metric(
            port,
            "tenantgate_statements_total",
            {"tenant": "acme", "command": "select", "outcome": "allowed"},
        )
        assert allowed == 11
    finally:
        running.stop()


def test_prepared_statements_checked_on_every_execution(
    enforce_proxy: RunningProxy, clean_tenant_db: TenantDb
) -> None:
    """Bind + Describe + Execute + Sync (libpq's prepared execution) on the fast path."""
    user = clean_tenant_db.user("acme")
    sql = "SELECT count(*), min(tenant_id) FROM orders WHERE tenant_id = %s AND id > %s"
    with psycopg.connect(enforce_proxy.dsn(user.name, user.password), autocommit=True) as conn:
        for _ in range(5):
            assert conn.execute(sql, ("acme", 0), prepare=True).fetchone() == (5, "acme")
        for _ in range(3):  # the same prepared statement, another tenant's id: refused each time
            with pytest.raises(errors.InsufficientPrivilege, match="wrong_tenant"):
                conn.execute(sql, ("globex", 0), prepare=True)
        assert conn.execute(sql, ("acme", 0), prepare=True).fetchone() == (5, "acme")
        assert_failed_transaction_recovers(conn, sql, prepare=True)
    port = enforce_proxy.app.metrics_port
    assert port is not None
    labels = {"tenant": "acme", "command": "select"}
    assert metric(port, "tenantgate_statements_total", {**labels, "outcome": "allowed"}) == 7
    assert metric(port, "tenantgate_rejections_total", {"tenant": "acme"}) == 3


def test_unnamed_parse_and_bind_checked_every_time(
    enforce_proxy: RunningProxy, clean_tenant_db: TenantDb
) -> None:
    """Parse + Bind + Describe + Execute + Sync of the unnamed statement (libpq's
    PQexecParams, pgbench -M extended) on the fast path: the Parse and the Bind are
    each checked on every execution, and a refusal leaves the session usable."""
    user = clean_tenant_db.user("acme")
    sql = "SELECT count(*), min(tenant_id) FROM orders WHERE tenant_id = %s AND id > %s"
    with psycopg.connect(enforce_proxy.dsn(user.name, user.password), autocommit=True) as conn:
        for _ in range(4):
            assert conn.execute(sql, ("acme", 0), prepare=False).fetchone() == (5, "acme")
        for _ in range(2):  # the Parse is fine, the Bind carries another tenant: refused
            with pytest.raises(errors.InsufficientPrivilege, match="wrong_tenant"):
                conn.execute(sql, ("globex", 0), prepare=False)
        for _ in range(2):  # the Parse itself is refused (no tenant predicate)
            with pytest.raises(errors.InsufficientPrivilege, match="tenantgate:"):
                conn.execute("SELECT count(*) FROM orders WHERE id > %s", (0,), prepare=False)
        # Another tenant's constant in the text: refused at Parse, whatever the Bind says.
        with pytest.raises(errors.InsufficientPrivilege, match="tenantgate:"):
            conn.execute(
                "SELECT count(*) FROM orders WHERE tenant_id = 'globex' AND id > %s",
                (0,),
                prepare=False,
            )
        rows = conn.execute(
            "SELECT id FROM orders WHERE tenant_id = %s ORDER BY id LIMIT %s",
            ("acme", 2),
            prepare=False,
        ).fetchall()
        assert len(rows) == 2
        assert_failed_transaction_recovers(conn, sql, prepare=False)
    port = enforce_proxy.app.metrics_port
    assert port is not None
    assert metric(port, "tenantgate_rejections_total", {"tenant": "acme"}) == 5


async def test_asyncpg_prepared_statements(
    enforce_proxy: RunningProxy, clean_tenant_db: TenantDb
) -> None:
    """asyncpg's prepared statements (its own message sequence): checked on every execution."""
    import asyncpg  # noqa: PLC0415

    user = clean_tenant_db.user("acme")
    conn = await asyncpg.connect(enforce_proxy.url(user.name, user.password))
    try:
        sql = "SELECT count(*) FROM orders WHERE tenant_id = $1 AND id > $2"
        statement = await conn.prepare(sql)
        for _ in range(5):
            assert await statement.fetchval("acme", 0) == 5
        for _ in range(2):
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="wrong_tenant"):
                await statement.fetchval("globex", 0)
        assert await statement.fetchval("acme", 0) == 5
    finally:
        await conn.close()
