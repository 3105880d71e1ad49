"""rlssql: the generated DDL parses, covers every table and quotes every name."""

from __future__ import annotations

from typing import Any

import pglast
import pytest
from pglast import ast, enums

from tenantgate.config import Policy, parse_policy
from tenantgate.errors import ConfigError
from tenantgate.rlssql import (
    GUARD_POLICY,
    ISOLATION_POLICY,
    generate_rls_sql,
    quote_ident,
    quote_literal,
    quote_qualified,
)

BASE = """
upstream: {database: app, user: app_tenant}
tables: {orders: tenant_id, billing.invoices: tenant_id, customers: org_id}
shared_tables: [plans, ref.countries]
tenants:
  acme: {users: {acme_app: {password: pw}}}
  globex: {users: {globex_app: {password: pw}}, upstream_user: globex_role}
"""


def policy(text: str = BASE) -> Policy:
    return parse_policy(text, env={})


def statements(sql: str) -> list[Any]:
    return [raw.stmt for raw in pglast.parse_sql(sql)]


def of(stmts: list[Any], cls: type) -> list[Any]:
    """The statements of one AST class (typed Any: pglast's optional fields are set here)."""
    return [s for s in stmts if isinstance(s, cls)]


def rel(node: Any) -> str:
    """``schema.table`` of a RangeVar; "" for other nodes (schema or function objects)."""
    if not isinstance(node, ast.RangeVar):
        return ""
    return f"{node.schemaname}.{node.relname}" if node.schemaname else str(node.relname)


def roles(specs: Any) -> list[str]:
    out = []
    for spec in specs:
        if spec.roletype == enums.RoleSpecType.ROLESPEC_PUBLIC:
            out.append("PUBLIC")
        else:
            out.append(spec.rolename)
    return out


# --- quoting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "quoted"),
    [
        ("orders", "orders"),
        ("_x1", "_x1"),
        ("name", "name"),  # unreserved keyword: bare, like PostgreSQL's quote_ident
        ("Orders", '"Orders"'),
        ("order", '"order"'),
        ("user", '"user"'),
        ("select", '"select"'),
        ("tab$1", '"tab$1"'),
        ("1abc", '"1abc"'),
        ("Scratch Role", '"Scratch Role"'),
        ('a"b', '"a""b"'),
        ("ünï", '"ünï"'),
    ],
)
def test_quote_ident(name: str, quoted: str) -> None:
    assert quote_ident(name) == quoted


@pytest.mark.parametrize("bad", ["", "a\x00b"])
def test_quote_ident_refuses(bad: str) -> None:
    with pytest.raises(ValueError):
        quote_ident(bad)


def test_quote_qualified_and_literal() -> None:
    assert quote_qualified("billing.invoices") == "billing.invoices"
    assert quote_qualified("billing.order") == 'billing."order"'
    assert quote_qualified("user") == '"user"'
    with pytest.raises(ValueError):
        quote_qualified("a.b.c")
    assert quote_literal("it's") == "'it''s'"
    assert quote_literal("back\\slash") == "'back\\slash'"
    with pytest.raises(ValueError):
        quote_literal("\x00")


# --- structure -------------------------------------------------------------------


def test_one_transaction_that_parses() -> None:
    stmts = statements(generate_rls_sql(policy()))
    assert isinstance(stmts[0], ast.TransactionStmt)
    assert stmts[0].kind == enums.TransactionStmtKind.TRANS_STMT_BEGIN
    assert isinstance(stmts[-1], ast.TransactionStmt)
    assert stmts[-1].kind == enums.TransactionStmtKind.TRANS_STMT_COMMIT
    middle = stmts[1:-1]
    assert not any(of(middle, ast.TransactionStmt))


def test_current_tenant_function() -> None:
    sql = generate_rls_sql(policy())
    (fn,) = list(of(statements(sql), ast.CreateFunctionStmt))
    assert fn.replace
    assert [n.sval for n in fn.funcname] == ["tenantgate", "current_tenant"]
    options = {o.defname: o.arg for o in fn.options}
    assert options["language"].sval == "sql"
    assert options["volatility"].sval == "stable"
    assert options["parallel"].sval == "safe"
    assert "set" not in options  # no SET clause: BEGIN ATOMIC instead, still inlinable
    assert fn.sql_body is not None
    assert "NULLIF(pg_catalog.current_setting('app.tenant_id', true), '')" in sql
    assert "CREATE SCHEMA IF NOT EXISTS tenantgate;" in sql
    grants = list(of(statements(sql), ast.GrantStmt))
    function_grants = [
        g for g in grants if g.objtype == enums.ObjectType.OBJECT_FUNCTION and g.is_grant
    ]
    assert len(function_grants) == 1
    assert function_grants[0].privileges[0].priv_name == "execute"
    assert roles(function_grants[0].grantees) == ["app_tenant", "globex_role"]


def test_every_scoped_table_is_covered() -> None:
    p = policy()
    stmts = statements(generate_rls_sql(p))
    for table, column in p.tables.items():
        alters = [
            cmd.subtype
            for s in of(stmts, ast.AlterTableStmt)
            if rel(s.relation) == table
            for cmd in s.cmds
        ]
        assert enums.AlterTableType.AT_EnableRowSecurity in alters
        assert enums.AlterTableType.AT_ForceRowSecurity in alters
        policies = [s for s in of(stmts, ast.CreatePolicyStmt) if rel(s.table) == table]
        assert {(s.policy_name, s.permissive) for s in policies} == {
            (ISOLATION_POLICY, True),
            (GUARD_POLICY, False),
        }
        for created in policies:
            assert created.cmd_name == "all"
            assert roles(created.roles) == ["app_tenant", "globex_role"]
            expr: Any
            for expr in (created.qual, created.with_check):
                assert type(expr).__name__ == "A_Expr"
                assert [n.sval for n in expr.name] == ["="]
                assert [f.sval for f in expr.lexpr.fields] == [column]
                assert type(expr.rexpr).__name__ == "FuncCall"
                assert [n.sval for n in expr.rexpr.funcname] == ["tenantgate", "current_tenant"]
        drops = [
            s for s in of(stmts, ast.DropStmt) if s.removeType == enums.ObjectType.OBJECT_POLICY
        ]
        dropped = {(tuple(n.sval for n in obj)) for d in drops for obj in d.objects}
        schema_parts = tuple(table.split("."))
        assert (*schema_parts, ISOLATION_POLICY) in dropped
        assert (*schema_parts, GUARD_POLICY) in dropped
        revokes = [
            s
            for s in of(stmts, ast.GrantStmt)
            if not s.is_grant and any(rel(o) == table for o in s.objects)
        ]
        assert len(revokes) == 1
        assert {p.priv_name for p in revokes[0].privileges} == {
            "truncate",
            "references",
            "trigger",
        }
        assert roles(revokes[0].grantees) == ["PUBLIC", "app_tenant", "globex_role"]


def test_policy_drop_comes_before_create() -> None:
    sql = generate_rls_sql(policy())
    for table in ("orders", "billing.invoices", "customers"):
        for name in (ISOLATION_POLICY, GUARD_POLICY):
            drop = sql.index(f"DROP POLICY IF EXISTS {name} ON {table};")
            create = sql.index(f"CREATE POLICY {name} ON {table} ")
            assert drop < create


def test_shared_tables_read_only() -> None:
    stmts = statements(generate_rls_sql(policy()))
    for table in ("plans", "ref.countries"):
        grants = [s for s in of(stmts, ast.GrantStmt) if any(rel(o) == table for o in s.objects)]
        revoked = {p.priv_name for g in grants if not g.is_grant for p in g.privileges}
        granted = {p.priv_name for g in grants if g.is_grant for p in g.privileges}
        assert {"insert", "update", "delete", "truncate"} <= revoked
        assert granted == {"select"}
        assert not any(rel(s.table) == table for s in of(stmts, ast.CreatePolicyStmt))


def test_comments_on_views_and_partitions() -> None:
    sql = generate_rls_sql(policy())
    assert "security_invoker = true" in sql
    assert "partition" in sql.lower()


def test_tenant_role_override() -> None:
    stmts = statements(generate_rls_sql(policy(), tenant_role="Other Role"))
    created = list(of(stmts, ast.CreatePolicyStmt))
    assert created
    assert all(roles(s.roles) == ["Other Role"] for s in created)


def test_quoting_of_awkward_names() -> None:
    text = """
upstream: {database: app, user: "App Tenant"}
tenant_setting: my.tenant
tables: {"order": "user", "weird$s.group": tenant_id}
shared_tables: [select]
tenants: {t1: {users: {u: {password: p}}}}
"""
    sql = generate_rls_sql(policy(text), schema="Sec Schema")
    assert 'ALTER TABLE "order" FORCE ROW LEVEL SECURITY;' in sql
    assert 'ALTER TABLE "weird$s"."group" ENABLE ROW LEVEL SECURITY;' in sql
    assert '("user" = "Sec Schema".current_tenant())' in sql
    assert 'TO "App Tenant"' in sql
    assert "current_setting('my.tenant', true)" in sql
    assert 'GRANT SELECT ON "select" TO "App Tenant";' in sql
    stmts = statements(sql)  # still valid SQL
    tables = {rel(s.table) for s in of(stmts, ast.CreatePolicyStmt)}
    assert tables == {"order", "weird$s.group"}


def test_column_types_cast_the_setting_not_the_column() -> None:
    sql = generate_rls_sql(
        policy(), column_types={"orders": "uuid", "customers": "bigint", "billing.invoices": "text"}
    )
    assert "(tenant_id = tenantgate.current_tenant()::uuid)" in sql
    assert "(org_id = tenantgate.current_tenant()::bigint)" in sql
    assert "-- billing.invoices: tenant column tenant_id (text)" in sql
    statements(sql)


@pytest.mark.parametrize("bad", ["uuid; DROP TABLE x", "text)", "uuid --", "'x'"])
def test_column_types_are_validated(bad: str) -> None:
    with pytest.raises(ConfigError, match="not a type name"):
        generate_rls_sql(policy(), column_types={"orders": bad})


def test_column_types_for_unknown_table() -> None:
    with pytest.raises(ConfigError, match="not scoped"):
        generate_rls_sql(policy(), column_types={"nope": "uuid"})


def test_deterministic_and_sorted() -> None:
    p = policy()
    first = generate_rls_sql(p)
    assert first == generate_rls_sql(p)
    order = [rel(s.table) for s in of(statements(first), ast.CreatePolicyStmt) if s.permissive]
    assert order == sorted(order)


def test_no_tables() -> None:
    text = """
upstream: {database: app, user: app_tenant}
tenants: {t1: {users: {u: {password: p}}}}
"""
    stmts = statements(generate_rls_sql(policy(text)))
    assert not any(of(stmts, ast.CreatePolicyStmt))
    assert any(of(stmts, ast.CreateFunctionStmt))
