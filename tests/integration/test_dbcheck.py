"""``tenantgate.dbcheck``: the database audit behind ``tenantgate check``.

The shared test database must come out sound.  Every other case builds a
scratch database (and its own roles) from scratch, applies the DDL of
``tenantgate rls-sql``, checks that it is sound, then breaks exactly one thing
and expects the matching finding code (and exit code 1).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from typing import Any

import psycopg
import pytest
from psycopg import sql

from support.db import TenantDb
from tenantgate.cluster import Cluster
from tenantgate.config import Policy
from tenantgate.dbcheck import Finding, check_exit_code, format_findings, run_check
from tenantgate.errors import UpstreamError
from tenantgate.rlssql import generate_rls_sql

pytestmark = pytest.mark.postgres

SCRATCH = "dbcheck_scratch"
APP = "dbcheck_app"
OWNER = "dbcheck_owner"
OTHER = "dbcheck_globex"
APP_PW = "dbcheck-app-pw"
OTHER_PW = "dbcheck-globex-pw"
ROLES = (APP, OWNER, OTHER)

_SCHEMA = f"""
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO {OWNER};
GRANT USAGE ON SCHEMA public TO {APP}, {OTHER};
CREATE SCHEMA billing AUTHORIZATION {OWNER};
GRANT USAGE ON SCHEMA billing TO {APP}, {OTHER};
SET ROLE {OWNER};
CREATE TABLE orders (id bigserial PRIMARY KEY, tenant_id text NOT NULL, item text);
CREATE TABLE customers (id bigserial PRIMARY KEY, tenant_id text NOT NULL, name text);
CREATE TABLE billing.invoices (id bigserial PRIMARY KEY, tenant_id text NOT NULL, total numeric);
CREATE TABLE plans (id int PRIMARY KEY, name text);
CREATE TABLE events (id bigint, tenant_id text NOT NULL, at int) PARTITION BY RANGE (at);
CREATE TABLE events_0 PARTITION OF events FOR VALUES FROM (0) TO (100);
RESET ROLE;
GRANT SELECT, INSERT, UPDATE, DELETE ON orders, customers, billing.invoices, events
    TO {APP}, {OTHER};
"""


# An owner (or superuser) holds every privilege, including those RLS does not cover.
OWNER_PRIVILEGES = ("truncate_granted", "references_granted", "trigger_granted")


def codes(findings: list[Finding], severity: str = "error") -> set[str]:
    return {f.code for f in findings if f.severity == severity}


@pytest.fixture(scope="module")
def scratch_database(pg: Cluster) -> Iterator[str]:
    """The scratch database, created once per module (CREATE DATABASE takes ~1 s)."""
    with psycopg.connect(pg.make_dsn(), autocommit=True) as conn:
        _drop(conn)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(SCRATCH)))
    try:
        yield SCRATCH
    finally:
        with psycopg.connect(pg.make_dsn(), autocommit=True) as conn:
            _drop(conn)


@pytest.fixture
def scratch(pg: Cluster, tenant_db: TenantDb, scratch_database: str) -> Scratch:
    """A fresh schema and fresh roles in the scratch database, with the rls-sql DDL applied."""
    with psycopg.connect(pg.make_dsn(database=scratch_database), autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS billing, tenantgate, public CASCADE")
        _drop_roles(conn)
        for role in (APP, OTHER):
            password = APP_PW if role == APP else OTHER_PW
            conn.execute(
                sql.SQL(
                    "CREATE ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOBYPASSRLS NOINHERIT"
                ).format(sql.Identifier(role), sql.Literal(password))
            )
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(OWNER)))
        conn.execute("CREATE SCHEMA public")
    scratch = Scratch(pg, tenant_db)
    scratch.run(_SCHEMA)
    scratch.run(generate_rls_sql(scratch.policy))
    return scratch


def _drop_roles(conn: psycopg.Connection[Any]) -> None:
    """Drop the scratch roles (their objects and grants live only in the scratch database)."""
    for role in ROLES:
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
        if exists:
            if conn.info.dbname == SCRATCH:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def _drop(conn: psycopg.Connection[Any]) -> None:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(SCRATCH)))
    _drop_roles(conn)


class Scratch:
    """The scratch database and a policy (rls mode) whose upstream is it."""

    def __init__(self, pg: Cluster, tenant_db: TenantDb, **overrides: Any) -> None:
        self.pg = pg
        base = tenant_db.policy("rls", **overrides)
        tables = {**base.tables, "events": "tenant_id"}
        upstream = base.upstream.model_copy(
            update={"database": SCRATCH, "user": APP, "password": APP_PW}
        )
        self.policy: Policy = base.model_copy(update={"upstream": upstream, "tables": tables})

    def connect(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.pg.make_dsn(database=SCRATCH), autocommit=True)

    def run(self, statements: str) -> None:
        with self.connect() as conn:
            conn.execute(statements.encode())

    def check(self, policy: Policy | None = None) -> list[Finding]:
        return run_check(policy or self.policy)


# --- sound databases --------------------------------------------------------------------


def test_test_database_is_sound(tenant_db: TenantDb) -> None:
    findings = run_check(tenant_db.policy("rls"))
    assert codes(findings) == set(), format_findings(findings)
    assert check_exit_code(findings) == 0
    # Three tenants share app_tenant, which can read pg_stat_activity: a warning only.
    assert codes(findings, "warning") <= {"stats_shared_role"}
    assert "sound" in format_findings(findings)


def test_fresh_rls_sql_is_sound(scratch: Scratch) -> None:
    findings = scratch.check()
    assert codes(findings) == set(), format_findings(findings)
    assert check_exit_code(findings) == 0


# --- one thing broken at a time ---------------------------------------------------------

BREAKS: list[tuple[str, str, set[str]]] = [
    ("no_force", "ALTER TABLE orders NO FORCE ROW LEVEL SECURITY", {"rls_not_forced"}),
    ("disable_rls", "ALTER TABLE orders DISABLE ROW LEVEL SECURITY", {"rls_disabled"}),
    (
        "drop_permissive_policy",
        "DROP POLICY tenantgate_isolation ON customers",
        {"policy_missing"},
    ),
    (
        "policy_on_another_setting",
        "DROP POLICY tenantgate_isolation ON orders; DROP POLICY tenantgate_guard ON orders;"
        f" CREATE POLICY p ON orders TO {APP}"
        " USING (tenant_id = current_setting('app.other_id', true))",
        {"policy_missing", "policy_not_tenant_scoped"},
    ),
    (
        "policy_for_another_role",
        "DROP POLICY tenantgate_isolation ON orders;"
        f" CREATE POLICY p ON orders TO {OWNER} USING (tenant_id = tenantgate.current_tenant())",
        {"policy_missing"},
    ),
    (
        "wide_permissive_without_guard",
        "DROP POLICY tenantgate_guard ON orders;"
        f" CREATE POLICY wide ON orders FOR SELECT TO {APP} USING (true)",
        {"policy_not_tenant_scoped"},
    ),
    ("grant_truncate", f"GRANT TRUNCATE ON orders TO {APP}", {"truncate_granted"}),
    ("grant_truncate_public", "GRANT TRUNCATE ON customers TO PUBLIC", {"truncate_granted"}),
    ("grant_references", f"GRANT REFERENCES ON orders TO {APP}", {"references_granted"}),
    ("grant_trigger", f"GRANT TRIGGER ON billing.invoices TO {APP}", {"trigger_granted"}),
    ("bypassrls", f"ALTER ROLE {APP} BYPASSRLS", {"role_bypassrls"}),
    (
        "superuser",
        f"ALTER ROLE {APP} SUPERUSER",
        {"role_superuser", "stats_readable"},  # not every privilege a superuser implies
    ),
    ("owner", f"ALTER TABLE orders OWNER TO {APP}", {"role_owns_table", *OWNER_PRIVILEGES}),
    ("member_of_owner", f"GRANT {OWNER} TO {APP}", {"role_member_of_role", "role_owns_table"}),
    ("member_of_other", f"GRANT {OTHER} TO {APP}", {"role_member_of_role"}),
    (
        "view_without_security_invoker",
        f"CREATE VIEW orders_v AS SELECT * FROM orders; GRANT SELECT ON orders_v TO {APP}",
        {"view_not_security_invoker"},
    ),
    (
        "view_over_view",
        "CREATE VIEW inner_v WITH (security_invoker = true) AS SELECT * FROM billing.invoices;"
        " CREATE VIEW outer_v AS SELECT * FROM inner_v;"
        f" GRANT SELECT ON inner_v, outer_v TO {APP}",
        {"view_not_security_invoker"},
    ),
    (
        "view_over_partition",
        f"CREATE VIEW ev_v AS SELECT * FROM events_0; GRANT SELECT ON ev_v TO {APP}",
        {"view_not_security_invoker"},
    ),
    (
        "materialized_view",
        "CREATE MATERIALIZED VIEW orders_mv AS SELECT * FROM orders;"
        f" GRANT SELECT ON orders_mv TO {APP}",
        {"matview_over_scoped_table"},
    ),
    (
        "partition_without_rls",
        f"CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (100) TO (200);"
        f" GRANT SELECT ON events_1 TO {APP}",
        {"child_not_covered"},
    ),
    (
        "granted_partition_rls_not_forced",
        "ALTER TABLE events_0 ENABLE ROW LEVEL SECURITY;"
        f" CREATE POLICY p ON events_0 TO {APP} USING (tenant_id = tenantgate.current_tenant());"
        f" GRANT SELECT ON events_0 TO {APP}",
        {"child_not_covered"},
    ),
    (
        "inheritance_child",
        f"CREATE TABLE orders_old () INHERITS (orders); GRANT SELECT ON orders_old TO {APP}",
        {"child_not_covered"},
    ),
    ("missing_table", "DROP TABLE customers", {"table_missing"}),
    (
        "missing_column",
        "ALTER TABLE orders DROP COLUMN tenant_id CASCADE",  # drops the policies too
        {"tenant_column_missing", "policy_missing"},
    ),
    ("read_all_stats", f"GRANT pg_read_all_stats TO {APP}", {"stats_readable"}),
    ("monitor", f"GRANT pg_monitor TO {APP}", {"stats_readable"}),
    (
        "tenant_setting_default",
        f"ALTER ROLE {APP} IN DATABASE {SCRATCH} SET app.tenant_id = 'acme'",
        {"tenant_setting_has_default"},
    ),
    ("shared_table_writable", f"GRANT INSERT ON plans TO {APP}", {"shared_table_writable"}),
]


@pytest.mark.parametrize(
    ("statements", "expected"),
    [pytest.param(s, e, id=name) for name, s, e in BREAKS],
)
def test_each_break_is_reported(scratch: Scratch, statements: str, expected: set[str]) -> None:
    scratch.run(statements)
    findings = scratch.check()
    assert codes(findings) == expected, format_findings(findings)
    assert check_exit_code(findings) == 1
    for finding in findings:
        assert finding.fix
        assert finding.message


SOUND_CHANGES: list[tuple[str, str]] = [
    (
        "wide_permissive_limited_by_guard",
        f"CREATE POLICY wide ON orders FOR SELECT TO {APP} USING (true)",
    ),
    (
        "security_invoker_view",
        "CREATE VIEW orders_v WITH (security_invoker = on) AS SELECT * FROM orders;"
        f" GRANT SELECT ON orders_v TO {APP}",
    ),
    ("view_without_grant", "CREATE VIEW orders_v AS SELECT * FROM orders"),
    (
        "partition_without_grant",
        "CREATE TABLE events_1 PARTITION OF events FOR VALUES FROM (100) TO (200)",
    ),
    (
        "granted_partition_with_rls",
        "ALTER TABLE events_0 ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;"
        f" CREATE POLICY p ON events_0 TO {APP} USING (tenant_id = tenantgate.current_tenant());"
        f" GRANT SELECT ON events_0 TO {APP}",
    ),
    (
        "policy_reading_setting_directly_to_public",
        "DROP POLICY tenantgate_isolation ON orders; CREATE POLICY p ON orders"
        " USING (tenant_id = current_setting('app.tenant_id', true))",
    ),
    (
        "policy_through_plpgsql_function",
        "CREATE FUNCTION tenantgate.tenant_pl() RETURNS text LANGUAGE plpgsql STABLE AS"
        " $$ BEGIN RETURN current_setting('app.tenant_id', true); END $$;"
        f" GRANT EXECUTE ON FUNCTION tenantgate.tenant_pl() TO {APP};"
        " DROP POLICY tenantgate_isolation ON orders;"
        f" CREATE POLICY p ON orders TO {APP} USING (tenant_id = tenantgate.tenant_pl())",
    ),
]


@pytest.mark.parametrize("statements", [pytest.param(s, id=name) for name, s in SOUND_CHANGES])
def test_sound_variants_pass(scratch: Scratch, statements: str) -> None:
    scratch.run(statements)
    findings = scratch.check()
    assert codes(findings) == set(), format_findings(findings)


def test_view_without_grant_is_a_warning(scratch: Scratch) -> None:
    scratch.run("CREATE VIEW orders_v AS SELECT * FROM orders")
    findings = scratch.check()
    assert codes(findings, "warning") >= {"view_not_security_invoker"}
    assert check_exit_code(findings) == 0


def test_security_definer_function_is_a_warning(scratch: Scratch) -> None:
    scratch.run(
        "CREATE FUNCTION public.all_orders() RETURNS bigint LANGUAGE sql SECURITY DEFINER"
        " AS 'SELECT count(*) FROM orders'"
    )
    findings = scratch.check()
    assert codes(findings) == set()
    warnings = [f for f in findings if f.code == "security_definer_function"]
    assert len(warnings) == 1
    assert "all_orders()" in warnings[0].message
    assert "REVOKE EXECUTE ON FUNCTION public.all_orders()" in warnings[0].fix


def test_fix_sql_repairs_the_database(scratch: Scratch) -> None:
    """The ``fix`` of each finding is runnable SQL that makes the finding go away."""
    scratch.run(
        "ALTER TABLE orders NO FORCE ROW LEVEL SECURITY;"
        " ALTER TABLE customers DISABLE ROW LEVEL SECURITY;"
        f" GRANT TRUNCATE, TRIGGER ON billing.invoices TO {APP};"
        f" ALTER ROLE {APP} BYPASSRLS;"
        f" GRANT {OTHER} TO {APP};"
        f" CREATE VIEW orders_v AS SELECT * FROM orders; GRANT SELECT ON orders_v TO {APP};"
        f" GRANT UPDATE ON plans TO {APP}"
    )
    findings = scratch.check()
    assert codes(findings) == {
        "rls_not_forced",
        "rls_disabled",
        "truncate_granted",
        "trigger_granted",
        "role_bypassrls",
        "role_member_of_role",
        "view_not_security_invoker",
        "shared_table_writable",
    }
    for finding in findings:
        if finding.severity == "error":
            scratch.run(finding.fix)
    findings = scratch.check()
    assert codes(findings) == set(), format_findings(findings)


def test_per_tenant_upstream_roles_are_each_checked(scratch: Scratch, tenant_db: TenantDb) -> None:
    policy = Scratch(
        scratch.pg,
        tenant_db,
        tenants={"globex": {"upstream_user": OTHER, "upstream_password": OTHER_PW}},
    ).policy
    scratch.run(generate_rls_sql(policy))  # policies TO both roles
    assert codes(scratch.check(policy)) == set()

    scratch.run(f"ALTER ROLE {OTHER} BYPASSRLS; GRANT TRUNCATE ON orders TO {OTHER}")
    findings = scratch.check(policy)
    assert codes(findings) == {"role_bypassrls", "truncate_granted"}
    assert all(OTHER in f.message for f in findings if f.severity == "error")

    # A policy only for the shared role leaves the per-tenant role without one.
    scratch.run(
        f"ALTER ROLE {OTHER} NOBYPASSRLS; REVOKE TRUNCATE ON orders FROM {OTHER};"
        " DROP POLICY tenantgate_isolation ON orders;"
        f" CREATE POLICY tenantgate_isolation ON orders TO {APP}"
        " USING (tenant_id = tenantgate.current_tenant())"
    )
    findings = scratch.check(policy)
    assert codes(findings) == {"policy_missing"}
    assert next(f.message for f in findings if f.code == "policy_missing").count(OTHER) == 1


def test_stats_warning_only_when_a_role_serves_several_tenants(
    scratch: Scratch, tenant_db: TenantDb
) -> None:
    assert "stats_shared_role" in codes(scratch.check(), "warning")
    one_tenant = scratch.policy.model_copy(
        update={"tenants": {"acme": scratch.policy.tenants["acme"]}}
    )
    assert "stats_shared_role" not in codes(run_check(one_tenant), "warning")


def test_unreachable_database_raises(scratch: Scratch) -> None:
    wrong_pw = scratch.policy.model_copy(
        update={"upstream": scratch.policy.upstream.model_copy(update={"password": "nope"})}
    )
    with pytest.raises(UpstreamError, match="password authentication failed"):
        run_check(wrong_pw)
    closed = scratch.policy.model_copy(
        update={
            "upstream": scratch.policy.upstream.model_copy(
                update={"port": 1, "connect_timeout_s": 2}
            )
        }
    )
    with pytest.raises(UpstreamError):
        run_check(closed)
    missing_db = scratch.policy.model_copy(
        update={"upstream": scratch.policy.upstream.model_copy(update={"database": "nope_db"})}
    )
    with pytest.raises(UpstreamError, match="does not exist"):
        run_check(missing_db)


# --- pure helpers -----------------------------------------------------------------------


def test_format_and_exit_code() -> None:
    error = Finding("error", "rls_disabled", "table t: not enabled", "ALTER TABLE t ...;")
    warning = Finding("warning", "security_definer_function", "f() runs as x", "REVOKE ...;")
    assert check_exit_code([]) == 0
    assert check_exit_code([warning]) == 0
    assert check_exit_code([warning, error]) == 1
    text = format_findings([error, warning])
    assert "ERROR [rls_disabled] table t: not enabled" in text
    assert "fix: ALTER TABLE t ...;" in text
    assert "WARNING [security_definer_function]" in text
    assert "1 error(s), 1 warning(s)" in text
    assert "sound" in format_findings([warning])
    with pytest.raises(FrozenInstanceError):
        error.code = "x"  # type: ignore[misc]
