"""The fail-closed row-level-security DDL that ``tenantgate rls-sql`` prints.

Owns turning a :class:`~tenantgate.config.Policy` into one SQL script (a single
transaction) that, for every tenant-scoped table, enables and forces RLS and
creates a permissive and a restrictive policy keyed on
``tenantgate.current_tenant()``, revokes the privileges RLS does not cover, and
makes shared tables read-only for the tenant-facing role.  Also owns SQL
identifier and literal quoting for that script.  Pure: no I/O, no database.

Design choices, also explained in the script's comments:

* ``current_tenant()`` is ``LANGUAGE sql`` with a ``BEGIN ATOMIC`` body
  (PostgreSQL 14+): the body is parsed once, at creation, so a caller's
  ``search_path`` cannot redirect what it calls; it stays inlinable (no ``SET``
  clause) and treats "never set" (NULL) and "reset" ('') alike: both are NULL,
  and ``col = NULL`` is never true, so a session without a tenant sees nothing.
* The tenant column is compared with the function's text result.  For a
  non-text column pass its type in ``column_types``: the *setting* is cast
  (``col = tenantgate.current_tenant()::uuid``), never the column, so an index on
  the column stays usable.  Without a type, text is assumed and a comment shows
  the cast form.
* Policies apply ``TO`` the upstream role(s) only; with ``FORCE`` the table
  owner gets no policy and so sees no rows (run maintenance as a BYPASSRLS role).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from pglast.keywords import COL_NAME_KEYWORDS, RESERVED_KEYWORDS, TYPE_FUNC_NAME_KEYWORDS

from tenantgate.config import Policy
from tenantgate.errors import ConfigError

__all__ = [
    "GUARD_POLICY",
    "ISOLATION_POLICY",
    "generate_rls_sql",
    "quote_ident",
    "quote_literal",
    "quote_qualified",
]

ISOLATION_POLICY = "tenantgate_isolation"
GUARD_POLICY = "tenantgate_guard"
FUNCTION_NAME = "current_tenant"

_PLAIN_IDENT = re.compile(r"^[a-z_][a-z0-9_]*$")
# A type name as written in a cast: words, optional schema, optional (n[,m]) and [].
_TYPE_NAME = re.compile(
    r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?"
    r"( [A-Za-z_][A-Za-z0-9_]*)*(\(\d+(, ?\d+)?\))?(\[\])?$"
)
# Keywords that cannot be bare identifiers everywhere (unreserved ones can).
_QUOTED_KEYWORDS = frozenset(RESERVED_KEYWORDS) | COL_NAME_KEYWORDS | TYPE_FUNC_NAME_KEYWORDS
_TEXT_TYPES = frozenset({"text", "pg_catalog.text", "varchar", "character varying"})


def quote_ident(name: str) -> str:
    """Quote an identifier the way PostgreSQL's ``quote_ident`` does.

    Left bare only when it is lower case, starts with a letter or ``_`` and is not
    a keyword that would need quoting; otherwise double-quoted, ``"`` doubled.
    """
    if not name:
        raise ValueError("an identifier cannot be empty")
    if "\x00" in name:
        raise ValueError("an identifier cannot contain NUL")
    if _PLAIN_IDENT.match(name) and name not in _QUOTED_KEYWORDS:
        return name
    return '"' + name.replace('"', '""') + '"'


def quote_qualified(name: str) -> str:
    """Quote a ``schema.table`` or ``table`` name from the policy file, part by part."""
    parts = name.split(".")
    if len(parts) > 2:
        raise ValueError(f"{name!r} has more than two parts")
    return ".".join(quote_ident(part) for part in parts)


def quote_literal(value: str) -> str:
    """A standard-conforming string literal (``'`` doubled; backslashes are plain)."""
    if "\x00" in value:
        raise ValueError("a literal cannot contain NUL")
    return "'" + value.replace("'", "''") + "'"


def _tenant_roles(policy: Policy, tenant_role: str | None) -> list[str]:
    if tenant_role is not None:
        return [tenant_role]
    roles = [policy.upstream.user]
    for tenant in policy.tenants.values():
        if tenant.upstream_user and tenant.upstream_user not in roles:
            roles.append(tenant.upstream_user)
    return roles


def _cast_for(table: str, column_types: Mapping[str, str]) -> str | None:
    """The cast suffix for ``table``'s tenant column, or None for text."""
    raw = column_types.get(table)
    if raw is None:
        return None
    type_name = " ".join(raw.split())
    if not _TYPE_NAME.match(type_name):
        raise ConfigError(f"column type {raw!r} for table {table!r} is not a type name")
    if type_name.lower() in _TEXT_TYPES:
        return None
    return type_name


def generate_rls_sql(
    policy: Policy,
    tenant_role: str | None = None,
    *,
    schema: str = "tenantgate",
    column_types: Mapping[str, str] | None = None,
) -> str:
    """The DDL that makes every scoped table of ``policy`` fail closed under RLS.

    ``tenant_role`` overrides the role(s) the policies apply to (default: the
    upstream user plus every per-tenant ``upstream_user``).  ``schema`` names the
    schema holding ``current_tenant()``.  ``column_types`` maps a scoped table (as
    spelled in the policy) to its tenant column's SQL type when that is not text.
    """
    types = {name.lower(): value for name, value in (column_types or {}).items()}
    unknown = sorted(set(types) - set(policy.tables))
    if unknown:
        raise ConfigError(f"column_types names tables that are not scoped: {unknown}")
    roles = _tenant_roles(policy, tenant_role)
    role_list = ", ".join(quote_ident(role) for role in roles)
    qschema = quote_ident(schema)
    function = f"{qschema}.{FUNCTION_NAME}()"
    setting = quote_literal(policy.tenant_setting)

    out: list[str] = []
    emit = out.append
    emit("-- Fail-closed row-level security for tenantgate (generated by `tenantgate rls-sql`).")
    emit(f"-- Tenant setting: {policy.tenant_setting}.  Tenant-facing role(s): {', '.join(roles)}.")
    emit("-- Run as a superuser or the owner of the tables; safe to run again (idempotent).")
    emit("-- Requires PostgreSQL 14+ (BEGIN ATOMIC function bodies).")
    emit("-- Unqualified table names resolve through the search_path of the session running")
    emit("-- this script; qualify them in the policy file (schema.table) to be explicit.")
    emit("--")
    emit("-- The tenant-facing role must also be: NOSUPERUSER, NOBYPASSRLS, the owner of")
    emit("-- none of these tables and a member of no other role, e.g.")
    for role in roles:
        emit(f"--   ALTER ROLE {quote_ident(role)} NOSUPERUSER NOBYPASSRLS;")
    emit("-- (`tenantgate check --config PATH` verifies all of this against the database.)")
    emit("")
    emit("BEGIN;")
    emit("")
    emit("-- current_tenant(): the tenant of the current transaction, or NULL.")
    emit("-- NULL (never set in this session) and '' (set, then reset) both mean \"no tenant\",")
    emit("-- and `col = NULL` is never true, so without a tenant every policy hides every row.")
    emit("-- BEGIN ATOMIC binds every name when the function is created, so a caller's")
    emit("-- search_path cannot change what it calls; no SET clause keeps it inlinable.")
    emit(f"CREATE SCHEMA IF NOT EXISTS {qschema};")
    emit(f"REVOKE ALL ON SCHEMA {qschema} FROM PUBLIC;")
    emit(f"CREATE OR REPLACE FUNCTION {function} RETURNS pg_catalog.text")
    emit("    LANGUAGE sql STABLE PARALLEL SAFE")
    emit("BEGIN ATOMIC")
    emit(f"    SELECT NULLIF(pg_catalog.current_setting({setting}, true), '');")
    emit("END;")
    emit(
        f"COMMENT ON FUNCTION {function} IS "
        + quote_literal(f"tenantgate: the tenant id from {policy.tenant_setting}, or NULL")
        + ";"
    )
    emit(f"REVOKE ALL ON FUNCTION {function} FROM PUBLIC;")
    emit(f"GRANT USAGE ON SCHEMA {qschema} TO {role_list};")
    emit(f"GRANT EXECUTE ON FUNCTION {function} TO {role_list};")

    for table in sorted(policy.tables):
        column = policy.tables[table]
        qtable = quote_qualified(table)
        qcolumn = quote_ident(column)
        cast = _cast_for(table, types)
        tenant_expr = function if cast is None else f"{function}::{cast}"
        predicate = f"({qcolumn} = {tenant_expr})"
        emit("")
        emit(f"-- {table}: tenant column {column} ({cast or 'text'})")
        if cast is None:
            emit(f"-- If {column} is not text (uuid, bigint, ...), cast the setting, not the")
            emit(f"-- column, so an index on {column} stays usable:")
            emit(f"--   USING ({qcolumn} = {function}::uuid)")
        emit(f"ALTER TABLE {qtable} ENABLE ROW LEVEL SECURITY;")
        emit(f"ALTER TABLE {qtable} FORCE ROW LEVEL SECURITY;")
        for name, kind in ((ISOLATION_POLICY, "PERMISSIVE"), (GUARD_POLICY, "RESTRICTIVE")):
            emit(f"DROP POLICY IF EXISTS {name} ON {qtable};")
            emit(f"CREATE POLICY {name} ON {qtable} AS {kind} FOR ALL TO {role_list}")
            emit(f"    USING {predicate}")
            emit(f"    WITH CHECK {predicate};")
        emit("-- RLS does not cover TRUNCATE (it empties every tenant), REFERENCES or TRIGGER.")
        emit(f"REVOKE TRUNCATE, REFERENCES, TRIGGER ON {qtable} FROM PUBLIC, {role_list};")
        emit("-- Grant the row privileges the application needs, e.g.:")
        emit(f"--   GRANT SELECT, INSERT, UPDATE, DELETE ON {qtable} TO {role_list};")

    if policy.shared_tables:
        emit("")
        emit("-- Shared tables: readable by every tenant, writable by none.")
    for table in sorted(policy.shared_tables):
        qtable = quote_qualified(table)
        emit(
            f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER ON {qtable} "
            f"FROM PUBLIC, {role_list};"
        )
        emit(f"GRANT SELECT ON {qtable} TO {role_list};")

    emit("")
    emit("-- Views over scoped tables run with their owner's rights unless created")
    emit("-- WITH (security_invoker = true) (PostgreSQL 15+); otherwise RLS is checked")
    emit("-- against the view owner.  Fix existing ones with:")
    emit("--   ALTER VIEW <view> SET (security_invoker = true);")
    emit("-- Partitions and inheritance children: policies on a parent apply only to")
    emit("-- queries through the parent.  A partition queried by name uses its own")
    emit("-- policies: run the statements above for every partition too, or grant the")
    emit("-- tenant-facing role nothing on partitions.  Tables created later need this")
    emit("-- script run again.")
    emit("")
    emit("COMMIT;")
    return "\n".join(out) + "\n"
