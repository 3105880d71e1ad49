"""The generated RLS DDL against a real server: fail closed, per-tenant, write-checked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql

from support.db import ORDERS_PER_TENANT, TENANTS, TenantDb
from tenantgate.cluster import Cluster
from tenantgate.config import parse_policy
from tenantgate.rlssql import generate_rls_sql

pytestmark = pytest.mark.postgres

Conn = psycopg.Connection[tuple[Any, ...]]
SCOPED = ("orders", "customers", "billing.invoices")


@pytest.fixture
def app(tenant_db: TenantDb) -> Iterator[Conn]:
    """``app_tenant`` straight to PostgreSQL (no proxy), autocommit."""
    with psycopg.connect(tenant_db.app_dsn, autocommit=True) as conn:
        yield conn


def count(conn: Conn, table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(row[0])


def set_tenant(conn: Conn, tenant: str) -> None:
    conn.execute("SELECT set_config('app.tenant_id', %s, true)", (tenant,))


def run_as_tenant(conn: Conn, tenant: str | None, statement: str) -> int:
    """Run ``statement`` in a transaction with ``tenant`` set (None: not set); rowcount."""
    with conn.transaction():
        if tenant is not None:
            set_tenant(conn, tenant)
        return conn.execute(statement).rowcount


def test_no_tenant_sees_no_rows(app: Conn) -> None:
    for table in SCOPED:
        assert count(app, table) == 0
    assert count(app, "plans") == 3  # shared


def test_tenant_sees_exactly_its_rows(app: Conn, tenant_db: TenantDb) -> None:
    for tenant in TENANTS:
        expected = tenant_db.snapshot(tenant)
        with app.transaction():
            set_tenant(app, tenant)
            for table in SCOPED:
                rows = app.execute(f"SELECT * FROM {table} ORDER BY id").fetchall()
                assert rows == expected[table]
            secrets = [r[0] for r in app.execute("SELECT secret FROM orders")]
        assert len(secrets) == ORDERS_PER_TENANT
        assert all(s.startswith(f"{tenant}-secret-") for s in secrets)
    # Transaction-local: gone after COMMIT (the setting is now '', not NULL).
    assert count(app, "orders") == 0


def test_empty_and_null_tenant_mean_none(app: Conn) -> None:
    row = app.execute("SELECT tenantgate.current_tenant()").fetchone()
    assert row == (None,)
    with app.transaction():
        set_tenant(app, "")
        assert app.execute("SELECT tenantgate.current_tenant()").fetchone() == (None,)
        for table in SCOPED:
            assert count(app, table) == 0


def test_with_check_refuses_foreign_rows(clean_tenant_db: TenantDb, app: Conn) -> None:
    before = {t: clean_tenant_db.snapshot(t) for t in TENANTS}
    refused = "row-level security"
    with pytest.raises(errors.InsufficientPrivilege, match=refused):
        run_as_tenant(app, "acme", "INSERT INTO orders (tenant_id, item) VALUES ('globex', 'x')")
    with pytest.raises(errors.InsufficientPrivilege, match=refused):
        run_as_tenant(app, "acme", "UPDATE orders SET tenant_id = 'globex'")
    with pytest.raises(errors.InsufficientPrivilege, match=refused):
        run_as_tenant(app, None, "INSERT INTO orders (tenant_id, item) VALUES ('acme', 'none')")
    with app.transaction():
        set_tenant(app, "acme")
        assert app.execute("UPDATE orders SET item = 'x' WHERE tenant_id = 'globex'").rowcount == 0
        assert app.execute("DELETE FROM customers WHERE tenant_id <> 'acme'").rowcount == 0
    assert {t: clean_tenant_db.snapshot(t) for t in TENANTS} == before


def test_own_writes_work(clean_tenant_db: TenantDb, app: Conn) -> None:
    globex_before = clean_tenant_db.snapshot("globex")
    with app.transaction():
        set_tenant(app, "acme")
        app.execute("INSERT INTO orders (tenant_id, item) VALUES ('acme', 'new')")
        assert app.execute("UPDATE orders SET amount = 0").rowcount == ORDERS_PER_TENANT + 1
        assert app.execute("DELETE FROM billing.invoices").rowcount == 2
    assert len(clean_tenant_db.snapshot("acme")["orders"]) == ORDERS_PER_TENANT + 1
    assert clean_tenant_db.snapshot("globex") == globex_before


@pytest.mark.parametrize("table", [*SCOPED, "plans"])
def test_truncate_denied(app: Conn, table: str) -> None:
    with pytest.raises(errors.InsufficientPrivilege):
        app.execute(f"TRUNCATE {table}")


def test_shared_table_read_only(app: Conn) -> None:
    for statement in (
        "INSERT INTO plans VALUES (9, 'x', 1)",
        "UPDATE plans SET price = 0",
        "DELETE FROM plans",
    ):
        with pytest.raises(errors.InsufficientPrivilege):
            app.execute(statement)


def test_owner_is_forced_too(tenant_db: TenantDb) -> None:
    with psycopg.connect(tenant_db.owner_dsn, autocommit=True) as owner:
        for table in SCOPED:
            assert count(owner, table) == 0
        with owner.transaction():
            set_tenant(owner, "acme")
            assert count(owner, "orders") == 0  # no policy applies to the owner


def test_search_path_cannot_redirect(app: Conn) -> None:
    with app.transaction():
        app.execute("SET LOCAL search_path = ''")
        set_tenant(app, "acme")
        row = app.execute("SELECT count(*) FROM public.orders").fetchone()
        assert row == (ORDERS_PER_TENANT,)
    row = app.execute(
        "SELECT prosqlbody IS NOT NULL, provolatile, proparallel FROM pg_proc "
        "WHERE oid = 'tenantgate.current_tenant()'::regprocedure"
    ).fetchone()
    assert row == (True, "s", "s")


def test_index_on_tenant_column_is_usable(app: Conn) -> None:
    with app.transaction():
        app.execute("SET LOCAL enable_seqscan = off")
        set_tenant(app, "acme")
        plan = "\n".join(r[0] for r in app.execute("EXPLAIN SELECT * FROM orders"))
    assert "orders_tenant_id_idx" in plan


def test_policies_in_catalog(tenant_db: TenantDb) -> None:
    with tenant_db.connect() as conn:
        rows = conn.execute(
            "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, "
            "  array_agg(p.polname || ':' || p.polpermissive::text ORDER BY p.polname) "
            "FROM pg_class c JOIN pg_policy p ON p.polrelid = c.oid "
            "GROUP BY 1, 2, 3 ORDER BY 1"
        ).fetchall()
    assert [r[0] for r in rows] == ["customers", "invoices", "orders"]
    for _, enabled, forced, policies in rows:
        assert enabled
        assert forced
        assert policies == ["tenantgate_guard:false", "tenantgate_isolation:true"]


def test_ddl_is_idempotent(tenant_db: TenantDb) -> None:
    ddl = generate_rls_sql(tenant_db.policy())
    with tenant_db.connect() as conn:
        conn.execute(ddl.encode())
        conn.execute(ddl.encode())
        row = conn.execute("SELECT count(*) FROM pg_policy").fetchone()
    assert row == (6,)


def test_restrictive_guard_limits_a_permissive_policy(tenant_db: TenantDb, app: Conn) -> None:
    """A too-wide extra permissive policy cannot widen access past the guard."""
    with tenant_db.connect() as conn:
        conn.execute("CREATE POLICY too_wide ON customers FOR SELECT TO app_tenant USING (true)")
    try:
        with app.transaction():
            set_tenant(app, "acme")
            names = {r[0] for r in app.execute("SELECT tenant_id FROM customers")}
        assert names == {"acme"}
        assert count(app, "customers") == 0
    finally:
        with tenant_db.connect() as conn:
            conn.execute("DROP POLICY too_wide ON customers")


@pytest.fixture
def scratch_db(pg: Cluster) -> Iterator[str]:
    """A throwaway database (superuser DSN) for DDL shapes the shared one lacks."""
    name = "rlssql_scratch"
    with psycopg.connect(pg.make_dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield pg.make_dsn(database=name)
    finally:
        with psycopg.connect(pg.make_dsn(), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
            conn.execute('DROP ROLE IF EXISTS "Scratch Role"')


def test_keywords_dollar_names_and_uuid_column(pg: Cluster, scratch_db: str) -> None:
    policy = parse_policy(
        """
upstream: {database: rlssql_scratch, user: "Scratch Role"}
tables: {"group": tenant_id, "weird$s.tab$1": "user", docs: tenant_id}
shared_tables: [select]
tenants: {"0f8fad5b-d9cb-469f-a165-70867728950e": {users: {u: {password: p}}}}
""",
        env={},
    )
    ddl = generate_rls_sql(policy, column_types={"docs": "uuid"})
    tenant = "0f8fad5b-d9cb-469f-a165-70867728950e"
    with psycopg.connect(scratch_db, autocommit=True) as conn:
        conn.execute(
            """
            DROP ROLE IF EXISTS "Scratch Role";
            CREATE ROLE "Scratch Role" LOGIN PASSWORD 'scratch-pw';
            CREATE SCHEMA "weird$s";
            CREATE TABLE "group" (id int, tenant_id text);
            CREATE TABLE "weird$s"."tab$1" (id int, "user" text);
            CREATE TABLE docs (id int, tenant_id uuid);
            CREATE TABLE "select" (id int);
            INSERT INTO "group" VALUES (1, %(t)s), (2, 'other');
            INSERT INTO "weird$s"."tab$1" VALUES (1, %(t)s), (2, 'other');
            INSERT INTO docs VALUES (1, %(t)s), (2, gen_random_uuid());
            GRANT USAGE ON SCHEMA "weird$s" TO "Scratch Role";
            GRANT SELECT ON "group", "weird$s"."tab$1", docs TO "Scratch Role";
            GRANT ALL ON "select" TO "Scratch Role";
            """.replace("%(t)s", f"'{tenant}'")
        )
        conn.execute(ddl.encode())
    role_dsn = pg.make_dsn("rlssql_scratch", "Scratch Role", "scratch-pw")
    with psycopg.connect(role_dsn, autocommit=True) as conn:
        for table in ('"group"', '"weird$s"."tab$1"', "docs"):
            assert count(conn, table) == 0
            with conn.transaction():
                set_tenant(conn, tenant)
                assert conn.execute(f"SELECT id FROM {table}").fetchall() == [(1,)]
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute('INSERT INTO "select" VALUES (1)')
        assert count(conn, '"select"') == 0
        # A tenant id that is not a uuid cannot match a uuid column: an error, not rows.
        with pytest.raises(errors.InvalidTextRepresentation):
            run_as_tenant(conn, "acme", "SELECT * FROM docs")
