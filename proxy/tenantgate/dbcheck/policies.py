"""RLS policies of a scoped table: read from ``pg_policy``, judged against the tenant setting.

A policy is tenant-bound when every expression it has (USING, WITH CHECK)
names the tenant column and reads the tenant setting, directly with
``current_setting('<setting>')`` or through a function whose definition does.
"""

# Catalog queries interpolate only oids read from the catalogs (checked to be digits)
# and names quoted by quote_literal / quote_ident:
# ruff: noqa: S608

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from tenantgate.dbcheck.catalog import CatalogClient, is_true
from tenantgate.dbcheck.findings import Finding
from tenantgate.rlssql import quote_ident

_CMD_NAMES = {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}


@dataclass(frozen=True, slots=True)
class _PolicyRow:
    name: str
    permissive: bool
    cmd: str
    applies: bool
    qual: str | None
    with_check: str | None
    functions: str  # definitions of functions the policy calls (transitively)


def _reads_setting(text: str, setting: str) -> bool:
    pattern = r"current_setting\s*\(\s*'" + re.escape(setting) + r"'"
    return re.search(pattern, text, re.IGNORECASE) is not None


def _mentions_column(expression: str, column: str) -> bool:
    bare = r"(?<![\w$\"])" + re.escape(column) + r"(?![\w$\"])"
    return re.search(bare, expression, re.IGNORECASE) is not None or f'"{column}"' in expression


def _tenant_bound(policy: _PolicyRow, setting: str, column: str) -> bool:
    """Every expression of the policy compares the tenant column with the setting."""
    expressions = [e for e in (policy.qual, policy.with_check) if e is not None]
    if not expressions:
        return False
    for expression in expressions:
        if not _mentions_column(expression, column):
            return False
        if not (_reads_setting(expression, setting) or _reads_setting(policy.functions, setting)):
            return False
    return True


def _policies_sql(relid: str, role_oid: str) -> str:
    return f"""
SELECT p.polname, p.polpermissive, p.polcmd,
       (SELECT bool_or(CASE WHEN r = 0 THEN true
                            ELSE pg_catalog.pg_has_role({role_oid}::oid, r, 'MEMBER') END)
          FROM pg_catalog.unnest(p.polroles) AS r),
       pg_catalog.pg_get_expr(p.polqual, p.polrelid),
       pg_catalog.pg_get_expr(p.polwithcheck, p.polrelid),
       (WITH RECURSIVE f(oid) AS (
            SELECT d.refobjid FROM pg_catalog.pg_depend d
             WHERE d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass AND d.objid = p.oid
               AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass
            UNION
            SELECT d.refobjid FROM pg_catalog.pg_depend d JOIN f ON d.objid = f.oid
             WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass
               AND d.refclassid = 'pg_catalog.pg_proc'::pg_catalog.regclass)
        SELECT pg_catalog.string_agg(
                 CASE WHEN pr.prokind = 'f' THEN pg_catalog.pg_get_functiondef(pr.oid)
                      ELSE pr.prosrc END, E'\\n')
          FROM f JOIN pg_catalog.pg_proc pr ON pr.oid = f.oid)
  FROM pg_catalog.pg_policy p
 WHERE p.polrelid = {relid}::oid
 ORDER BY p.polname"""


async def policies_of(client: CatalogClient, relid: str, role_oid: str) -> list[_PolicyRow]:
    return [
        _PolicyRow(
            name=row[0] or "",
            permissive=is_true(row[1]),
            cmd=row[2] or "*",
            applies=is_true(row[3]),
            qual=row[4],
            with_check=row[5],
            functions=row[6] or "",
        )
        for row in await client.rows(_policies_sql(relid, role_oid))
    ]


def judge_policies(
    policies: Sequence[_PolicyRow], table: str, role: str, setting: str, column: str
) -> list[Finding]:
    applicable = [p for p in policies if p.applies]
    good = {p.name for p in applicable if _tenant_bound(p, setting, column)}
    qtable, qrole = table, quote_ident(role)
    out: list[Finding] = []
    if not any(p.permissive and p.name in good for p in applicable):
        predicate = f"({quote_ident(column)} = tenantgate.current_tenant())"
        out.append(
            Finding(
                "error",
                "policy_missing",
                f"table {qtable}: no PERMISSIVE policy for role {role} (or PUBLIC) compares "
                f"{column} with the tenant setting {setting}",
                f"CREATE POLICY tenantgate_isolation ON {qtable} AS PERMISSIVE FOR ALL "
                f"TO {qrole} USING {predicate} WITH CHECK {predicate};  "
                "(or run the output of `tenantgate rls-sql`)",
            )
        )
    for policy in applicable:
        if not policy.permissive or policy.name in good:
            continue
        guarded = any(
            not p.permissive and p.name in good and p.cmd in ("*", policy.cmd) for p in applicable
        )
        if not guarded:
            out.append(
                Finding(
                    "error",
                    "policy_not_tenant_scoped",
                    f"table {qtable}: PERMISSIVE policy {policy.name} "
                    f"(FOR {_CMD_NAMES.get(policy.cmd, policy.cmd)}) applies to role {role} "
                    f"but does not compare {column} with {setting}, and no RESTRICTIVE "
                    "tenant policy limits it: it widens access to other tenants' rows",
                    f"DROP POLICY {quote_ident(policy.name)} ON {qtable};  (or add the "
                    "RESTRICTIVE tenantgate_guard policy from `tenantgate rls-sql`)",
                )
            )
    return out
