"""``tenantgate check``: audit the upstream database for what rls mode relies on.

Owns connecting as the proxy's upstream role (and every per-tenant
``upstream_user``), reading the catalogs through a minimal simple-query client
(:mod:`tenantgate.upstream` + :mod:`tenantgate.protocol`; no driver), and
turning what it sees into :class:`Finding` values, each with the SQL or action
that fixes it.  Nothing here changes the database.

Checked, per tenant-facing role:

* the role: superuser, BYPASSRLS, owner (or member of the owner) of a scoped
  table, member of any other role, CREATEROLE (warning), a default for the
  tenant setting (``ALTER ROLE/DATABASE ... SET`` or postgresql.conf: the
  session would start with a tenant, failing open);
* each scoped table: missing, lacking the tenant column, RLS not enabled, not
  FORCEd, no PERMISSIVE policy for the role (or PUBLIC) whose USING/WITH CHECK
  compare the tenant column with the tenant setting (read directly with
  ``current_setting('<setting>')`` or through a function whose definition
  does, e.g. ``tenantgate.current_tenant()``), a permissive policy that does not
  and is not limited by a RESTRICTIVE one that does, TRUNCATE/REFERENCES/TRIGGER
  granted;
* views (transitively) and materialized views over a scoped table or its
  children that the role may use without ``security_invoker``;
* partitions and inheritance children the role has privileges on, without
  their own enabled+forced RLS and tenant policy;
* statement text of other sessions: superuser or ``pg_read_all_stats``
  (error); several tenants sharing one role that can read pg_stat_activity /
  pg_stat_statements (warning: the proxy's statement guard must keep tenants
  away from those views);
* SECURITY DEFINER functions the role may execute (warning);
* shared tables: missing (warning), writable by the role (error).

Exit-code contract (for the CLI): :func:`check_exit_code` is 0 when no finding
has severity ``error``, else 1; when the database cannot be reached
:func:`check_database` raises :class:`~tenantgate.errors.UpstreamError`
(exit 2, like a configuration error).
"""

# Catalog queries interpolate only oids read from the catalogs (checked to be digits)
# and names quoted by quote_literal / quote_ident:
# ruff: noqa: S608

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from tenantgate.config import Policy, UpstreamConfig
from tenantgate.errors import RemoteProtocolError, UpstreamError
from tenantgate.protocol.backend import DataRow, ErrorResponse
from tenantgate.protocol.framing import MessageReader, frame
from tenantgate.protocol.frontend import Query
from tenantgate.rlssql import quote_ident, quote_literal, quote_qualified
from tenantgate.upstream import UpstreamConnection, connect

__all__ = [
    "Finding",
    "Severity",
    "check_database",
    "check_exit_code",
    "format_findings",
    "run_check",
]

Severity = Literal["error", "warning"]
QUERY_TIMEOUT_S = 30.0
_READ = 64 * 1024
_TRUE_OPTIONS = frozenset({"true", "on", "yes", "1"})
_DANGEROUS_PRIVILEGES = ("TRUNCATE", "REFERENCES", "TRIGGER")
_ANY_PRIVILEGE = "SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER"
_WRITE_PRIVILEGES = "INSERT,UPDATE,DELETE,TRUNCATE"
# Memberships reported as stats_readable rather than role_member_of_role.
_STATS_ROLES = "'pg_read_all_stats', 'pg_monitor'"
_CMD_NAMES = {"*": "ALL", "r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE"}


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in the database.

    ``code`` is a stable snake_case identifier (tests and scripts match on it);
    ``fix`` is the SQL (or the action) that removes the problem.
    """

    severity: Severity
    code: str
    message: str
    fix: str


Row = tuple[str | None, ...]


class _QueryFailed(UpstreamError):
    """A catalog query returned an ErrorResponse."""


class _CatalogClient:
    """Simple-query protocol over an authenticated upstream connection; text results."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        self._messages = MessageReader(max_size=64 * 1024 * 1024)

    async def rows(self, sql: str) -> list[Row]:
        try:
            return await asyncio.wait_for(self._rows(sql), QUERY_TIMEOUT_S)
        except TimeoutError:
            raise UpstreamError("timed out reading the catalogs") from None
        except (OSError, EOFError, RemoteProtocolError) as exc:
            raise UpstreamError(f"lost the connection while reading the catalogs: {exc}") from None

    async def _rows(self, sql: str) -> list[Row]:
        self._conn.writer.write(Query(sql).encode())
        await self._conn.writer.drain()
        out: list[Row] = []
        error: ErrorResponse | None = None
        while True:
            item = self._messages.next_message()
            if item is None:
                data = await self._conn.reader.read(_READ)
                if not data:
                    raise EOFError("server closed the connection")
                self._messages.feed(data)
                continue
            msg_type, payload = item
            if msg_type == ord("D"):
                values = DataRow.decode(payload).values
                out.append(tuple(None if v is None else v.decode("utf-8") for v in values))
            elif msg_type == ord("E"):
                error = ErrorResponse.decode(payload)
            elif msg_type == ord("Z"):
                if error is not None:
                    raise _QueryFailed(
                        f"catalog query failed: {error.get('M')} (SQLSTATE {error.sqlstate})"
                    )
                return out
            # RowDescription, CommandComplete, EmptyQuery, Notice, ParameterStatus: not needed.

    async def value(self, sql: str) -> str | None:
        rows = await self.rows(sql)
        return rows[0][0] if rows else None

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self._conn.writer.write(frame(b"X"))
        self._conn.close()


def _oid(value: str | None) -> str:
    """An oid read from the catalogs, checked before it is put into SQL text."""
    if value is None or not value.isdigit():
        raise UpstreamError(f"unexpected oid {value!r} from the catalogs")
    return value


def _true(value: str | None) -> bool:
    return value == "t"


def _lit(value: str) -> str:
    return quote_literal(value)


def _rel(schema: str | None, name: str | None) -> str:
    """A relation name for messages and fix SQL (schema-qualified, quoted)."""
    return f"{quote_ident(schema or '')}.{quote_ident(name or '')}"


# --- policies --------------------------------------------------------------------------


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


async def _policies(client: _CatalogClient, relid: str, role_oid: str) -> list[_PolicyRow]:
    return [
        _PolicyRow(
            name=row[0] or "",
            permissive=_true(row[1]),
            cmd=row[2] or "*",
            applies=_true(row[3]),
            qual=row[4],
            with_check=row[5],
            functions=row[6] or "",
        )
        for row in await client.rows(_policies_sql(relid, role_oid))
    ]


def _policy_findings(
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


# --- the check -------------------------------------------------------------------------


@dataclass(slots=True)
class _Role:
    name: str
    oid: str
    tenants: list[str]


class _Checker:
    def __init__(self, policy: Policy, client: _CatalogClient, role: _Role) -> None:
        self.policy = policy
        self.client = client
        self.role = role
        self.findings: list[Finding] = []
        # A superuser bypasses everything: report that, not every privilege it implies.
        self.superuser = False

    def add(self, severity: Severity, code: str, message: str, fix: str) -> None:
        self.findings.append(Finding(severity, code, message, fix))

    async def run(self, structural: bool) -> list[Finding]:
        await self._role_checks()
        await self._setting_default()
        scoped_oids: list[str] = []
        for table, column in self.policy.tables.items():
            scoped_oids.extend(await self._scoped_table(table, column, structural))
        if scoped_oids:
            await self._views(scoped_oids)
        for table in self.policy.shared_tables:
            await self._shared_table(table, structural)
        await self._security_definer()
        return self.findings

    async def _role_checks(self) -> None:
        role, oid = self.role.name, self.role.oid
        qrole = quote_ident(role)
        rows = await self.client.rows(
            "SELECT rolsuper, rolbypassrls, rolcreaterole, "
            "pg_catalog.pg_has_role(oid, 'pg_read_all_stats', 'MEMBER') "
            f"FROM pg_catalog.pg_roles WHERE oid = {oid}::oid"
        )
        superuser, bypass, createrole, stats = (_true(v) for v in rows[0])
        if superuser:
            self.add(
                "error",
                "role_superuser",
                f"role {role} is a superuser: row-level security never applies to it",
                f"ALTER ROLE {qrole} NOSUPERUSER;",
            )
        if bypass:
            self.add(
                "error",
                "role_bypassrls",
                f"role {role} has BYPASSRLS: row-level security never applies to it",
                f"ALTER ROLE {qrole} NOBYPASSRLS;",
            )
        if createrole and not superuser:
            self.add(
                "warning",
                "role_createrole",
                f"role {role} has CREATEROLE: it may be able to grant itself other roles",
                f"ALTER ROLE {qrole} NOCREATEROLE;",
            )
        self.superuser = superuser
        for (group,) in await self.client.rows(
            "SELECT g.rolname FROM pg_catalog.pg_auth_members m "
            "JOIN pg_catalog.pg_roles g ON g.oid = m.roleid "
            f"WHERE m.member = {oid}::oid AND g.rolname NOT IN ({_STATS_ROLES}) ORDER BY 1"
        ):
            self.add(
                "error",
                "role_member_of_role",
                f"role {role} is a member of role {group}: SET ROLE or inherited privileges "
                "can reach what that role can (e.g. other tenants' rows)",
                f"REVOKE {quote_ident(group or '')} FROM {qrole};",
            )
        if superuser or stats:
            how = "is a superuser" if superuser else "is a member of pg_read_all_stats"
            self.add(
                "error",
                "stats_readable",
                f"role {role} {how}: pg_stat_activity and pg_stat_statements show it the "
                "statement text of every session, including other tenants'",
                f"REVOKE pg_read_all_stats FROM {qrole};  (and any role granting it, e.g. "
                "pg_monitor)",
            )
        elif len(self.role.tenants) > 1:
            readable = await self.client.rows(
                "SELECT c.oid::pg_catalog.regclass::text FROM pg_catalog.pg_class c "
                "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.relname IN ('pg_stat_activity', 'pg_stat_statements') "
                f"AND pg_catalog.has_table_privilege({oid}::oid, c.oid, 'SELECT') ORDER BY 1"
            )
            if readable:
                names = [r[0] or "" for r in readable]
                views = ", ".join(names)
                tenants = ", ".join(self.role.tenants)
                self.add(
                    "warning",
                    "stats_shared_role",
                    f"tenants {tenants} share upstream role {role}, which can read {views}: "
                    "each session of the role sees the others' statement text; tenantgate's "
                    "statement guard must keep tenants from querying these views",
                    "give each tenant its own upstream_user, or "
                    + " ".join(
                        f"REVOKE SELECT ON {v} FROM PUBLIC, {qrole};" for v in views.split(", ")
                    ),
                )

    async def _setting_default(self) -> None:
        setting = self.policy.tenant_setting
        value = await self.client.value(f"SELECT pg_catalog.current_setting({_lit(setting)}, true)")
        if value:
            role = quote_ident(self.role.name)
            self.add(
                "error",
                "tenant_setting_has_default",
                f"a new session of role {self.role.name} starts with {setting} = {value!r} "
                "(ALTER ROLE/DATABASE ... SET or postgresql.conf): outside tenantgate's "
                "injected transactions RLS would show that tenant's rows instead of none",
                f"ALTER ROLE {role} RESET {setting}; ALTER DATABASE "
                f"{quote_ident(self.policy.upstream.database)} RESET {setting};  "
                "(and remove it from postgresql.conf)",
            )

    async def _scoped_table(self, table: str, column: str, structural: bool) -> list[str]:
        """Check one scoped table and its children; return their oids (for the view check)."""
        role_oid = self.role.oid
        rows = await self.client.rows(
            "SELECT c.oid, n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity, "
            f"pg_catalog.pg_has_role({role_oid}::oid, c.relowner, 'MEMBER'), "
            "pg_catalog.pg_get_userbyid(c.relowner), "
            "EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a WHERE a.attrelid = c.oid "
            f"  AND a.attname = {_lit(column)} AND a.attnum > 0 AND NOT a.attisdropped) "
            "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE c.oid = pg_catalog.to_regclass({_lit(quote_qualified(table))})"
        )
        if not rows:
            if structural:
                self.add(
                    "error",
                    "table_missing",
                    f"scoped table {table} does not exist (or is not visible to role "
                    f"{self.role.name} through its search_path)",
                    f"create {table}, or correct `tables:` in the policy file (schema.table)",
                )
            return []
        raw_oid, schema, name, enabled, forced, owns, owner, has_column = rows[0]
        oid = _oid(raw_oid)
        qtable = _rel(schema, name)
        if structural and not _true(has_column):
            self.add(
                "error",
                "tenant_column_missing",
                f"table {qtable} has no column {column} (its tenant column in the policy)",
                f"ALTER TABLE {qtable} ADD COLUMN {quote_ident(column)} text NOT NULL;  "
                "(or correct the column in the policy file)",
            )
        await self._rls_table(
            oid, qtable, column, _true(enabled), _true(forced), structural=structural
        )
        if _true(owns):
            self._owner_finding(qtable, owner or "")
        oids = [oid]
        for child in await self.client.rows(
            "WITH RECURSIVE ch(oid) AS ("
            f" SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent = {oid}::oid"
            " UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i"
            " JOIN ch ON i.inhparent = ch.oid)"
            " SELECT c.oid, n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity,"
            f" pg_catalog.has_table_privilege({role_oid}::oid, c.oid, {_lit(_ANY_PRIVILEGE)}),"
            f" pg_catalog.pg_has_role({role_oid}::oid, c.relowner, 'MEMBER'),"
            " pg_catalog.pg_get_userbyid(c.relowner)"
            " FROM ch JOIN pg_catalog.pg_class c ON c.oid = ch.oid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace ORDER BY 2, 3"
        ):
            await self._child(child, qtable, column)
            oids.append(_oid(child[0]))
        return oids

    def _owner_finding(self, qtable: str, owner: str) -> None:
        if self.superuser:
            return
        role = self.role.name
        via = "" if owner == role else f" (through membership in {owner})"
        self.add(
            "error",
            "role_owns_table",
            f"role {role} owns table {qtable}{via}: an owner can disable or drop its "
            "row-level security",
            f"ALTER TABLE {qtable} OWNER TO <a role tenants never use>;",
        )

    async def _rls_table(
        self,
        oid: str,
        qtable: str,
        column: str,
        enabled: bool,
        forced: bool,
        *,
        structural: bool,
    ) -> bool:
        """Report RLS / policy / privilege problems of one table; True when it is covered."""
        if structural and not enabled:
            self.add(
                "error",
                "rls_disabled",
                f"table {qtable}: row-level security is not enabled, every row is visible",
                f"ALTER TABLE {qtable} ENABLE ROW LEVEL SECURITY;",
            )
        if structural and not forced:
            self.add(
                "error",
                "rls_not_forced",
                f"table {qtable}: row-level security is not FORCEd, so it does not apply "
                "to the table owner",
                f"ALTER TABLE {qtable} FORCE ROW LEVEL SECURITY;",
            )
        policies = await _policies(self.client, oid, self.role.oid)
        policy_findings = _policy_findings(
            policies, qtable, self.role.name, self.policy.tenant_setting, column
        )
        self.findings.extend(policy_findings)
        privileges = await self.client.rows(
            "SELECT "
            + ", ".join(
                f"pg_catalog.has_table_privilege({self.role.oid}::oid, {oid}::oid, {_lit(p)})"
                for p in _DANGEROUS_PRIVILEGES
            )
        )
        for privilege, granted in zip(_DANGEROUS_PRIVILEGES, privileges[0], strict=True):
            if _true(granted) and not self.superuser:
                self.add(
                    "error",
                    f"{privilege.lower()}_granted",
                    f"role {self.role.name} has {privilege} on {qtable}, which row-level "
                    "security does not cover"
                    + (" (TRUNCATE empties every tenant)" if privilege == "TRUNCATE" else ""),
                    f"REVOKE {privilege} ON {qtable} FROM PUBLIC, {quote_ident(self.role.name)};",
                )
        return enabled and forced and not policy_findings

    async def _child(self, child: Row, parent: str, column: str) -> None:
        oid, schema, name, enabled, forced, privileged, owns, owner = child
        qchild = _rel(schema, name)
        if self.superuser:
            return
        if _true(owns):
            self._owner_finding(qchild, owner or "")
        if not _true(privileged):
            return  # reachable only through the parent, whose policies apply
        checker = _Checker(self.policy, self.client, self.role)
        covered = await checker._rls_table(
            _oid(oid), qchild, column, _true(enabled), _true(forced), structural=True
        )
        if not covered:
            details = "; ".join(f.message for f in checker.findings) or "not covered"
            self.add(
                "error",
                "child_not_covered",
                f"{qchild} is a partition or child of scoped table {parent} and role "
                f"{self.role.name} may query it by name, but its own row-level security does "
                f"not isolate tenants ({details})",
                f"run the statements of `tenantgate rls-sql` for {qchild} too (ENABLE + FORCE "
                f"ROW LEVEL SECURITY and the two policies), or REVOKE ALL ON {qchild} FROM "
                f"PUBLIC, {quote_ident(self.role.name)};",
            )
        else:
            # Covered by its own policies: only privilege problems (TRUNCATE...) remain.
            self.findings.extend(f for f in checker.findings if f.code.endswith("_granted"))

    async def _views(self, oids: Sequence[str]) -> None:
        array = "ARRAY[" + ", ".join(f"{o}::oid" for o in oids) + "]"
        rows = await self.client.rows(
            "WITH RECURSIVE v(oid) AS ("
            " SELECT r.ev_class FROM pg_catalog.pg_depend d"
            " JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid"
            " WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass"
            "   AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass"
            f"   AND d.refobjid = ANY({array}) AND r.ev_class <> d.refobjid"
            " UNION"
            " SELECT r.ev_class FROM v JOIN pg_catalog.pg_depend d ON d.refobjid = v.oid"
            " JOIN pg_catalog.pg_rewrite r ON r.oid = d.objid"
            " WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass"
            "   AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass"
            "   AND r.ev_class <> v.oid)"
            " SELECT n.nspname, c.relname, c.relkind,"
            "  (SELECT o.option_value FROM pg_catalog.pg_options_to_table(c.reloptions) o"
            "    WHERE o.option_name = 'security_invoker'),"
            f"  pg_catalog.has_table_privilege({self.role.oid}::oid, c.oid, {_lit(_ANY_PRIVILEGE)})"
            " FROM v JOIN pg_catalog.pg_class c ON c.oid = v.oid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace ORDER BY 1, 2"
        )
        for schema, name, kind, invoker, privileged in rows:
            qview = _rel(schema, name)
            usable = _true(privileged) and not self.superuser
            if kind == "m":
                if usable:
                    self.add(
                        "error",
                        "matview_over_scoped_table",
                        f"materialized view {qview} stores rows of a scoped table without "
                        f"row-level security, and role {self.role.name} may read it",
                        f"REVOKE ALL ON {qview} FROM PUBLIC, {quote_ident(self.role.name)};  "
                        "(or DROP MATERIALIZED VIEW)",
                    )
                continue
            if (invoker or "").lower() in _TRUE_OPTIONS:
                continue
            self.add(
                "error" if usable else "warning",
                "view_not_security_invoker",
                f"view {qview} reads a scoped table with its owner's rights (no "
                "security_invoker), so row-level security is checked against the owner, "
                + (
                    f"and role {self.role.name} may use it"
                    if usable
                    else f"(role {self.role.name} has no privileges on it now)"
                ),
                f"ALTER VIEW {qview} SET (security_invoker = true);",
            )

    async def _shared_table(self, table: str, structural: bool) -> None:
        rows = await self.client.rows(
            "SELECT n.nspname, c.relname, "
            f"pg_catalog.has_table_privilege({self.role.oid}::oid, c.oid, "
            f"{_lit(_WRITE_PRIVILEGES)}) "
            "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE c.oid = pg_catalog.to_regclass({_lit(quote_qualified(table))})"
        )
        if not rows:
            if structural:
                self.add(
                    "warning",
                    "shared_table_missing",
                    f"shared table {table} does not exist (or is not visible to role "
                    f"{self.role.name})",
                    f"create {table}, or correct `shared_tables:` in the policy file",
                )
            return
        schema, name, writable = rows[0]
        if _true(writable) and not self.superuser:
            qtable = _rel(schema, name)
            self.add(
                "error",
                "shared_table_writable",
                f"shared table {qtable} is writable by role {self.role.name}: one tenant "
                "could change what every tenant reads",
                f"REVOKE INSERT, UPDATE, DELETE, TRUNCATE ON {qtable} FROM PUBLIC, "
                f"{quote_ident(self.role.name)};",
            )

    async def _security_definer(self) -> None:
        if self.superuser:
            return
        rows = await self.client.rows(
            "SELECT pg_catalog.format('%I.%I(%s)', n.nspname, p.proname, "
            "pg_catalog.pg_get_function_identity_arguments(p.oid)), "
            "pg_catalog.pg_get_userbyid(p.proowner) "
            "FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace "
            "WHERE p.prosecdef AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            f"AND pg_catalog.has_function_privilege({self.role.oid}::oid, p.oid, 'EXECUTE') "
            "ORDER BY 1"
        )
        for signature, owner in rows:
            self.add(
                "warning",
                "security_definer_function",
                f"role {self.role.name} may execute SECURITY DEFINER function {signature} "
                f"(runs as {owner}; row-level security is checked against {owner})",
                f"REVOKE EXECUTE ON FUNCTION {signature} FROM PUBLIC, "
                f"{quote_ident(self.role.name)};  (or make sure it filters by tenant)",
            )


def _roles(policy: Policy) -> list[tuple[str, str | None, list[str]]]:
    """(user, password, tenants served) for every distinct tenant-facing upstream role."""
    roles: dict[str, tuple[str | None, list[str]]] = {}
    for tenant_id, tenant in policy.tenants.items():
        if tenant.upstream_user:
            user, password = tenant.upstream_user, tenant.upstream_password
        else:
            user, password = policy.upstream.user, policy.upstream.password
        entry = roles.setdefault(user, (password, []))
        entry[1].append(tenant_id)
    return [(user, password, tenants) for user, (password, tenants) in roles.items()]


async def _check_role(
    policy: Policy,
    cfg: UpstreamConfig,
    user: str,
    password: str | None,
    tenants: list[str],
    structural: bool,
) -> list[Finding]:
    if user == cfg.user:
        conn = await connect(cfg)
    else:
        conn = await connect(cfg, user=user, password=password)
    client = _CatalogClient(conn)
    try:
        oid = await client.value("SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user")
        if oid is None:
            raise UpstreamError(f"role {user} is not in pg_roles")
        return await _Checker(policy, client, _Role(user, _oid(oid), tenants)).run(structural)
    finally:
        client.close()


async def check_database(policy: Policy) -> list[Finding]:
    """Audit the upstream database as every tenant-facing role of ``policy``.

    Table-structure findings are reported once; role findings once per role.
    Raises :class:`UpstreamError` when a role cannot connect or a catalog query fails.
    """
    findings: list[Finding] = []
    for index, (user, password, tenants) in enumerate(_roles(policy)):
        role_findings = await _check_role(
            policy, policy.upstream, user, password, tenants, structural=index == 0
        )
        findings.extend(f for f in role_findings if f not in findings)
    return findings


def run_check(policy: Policy) -> list[Finding]:
    """:func:`check_database` on a fresh event loop (for the CLI and ``serve``)."""
    return asyncio.run(check_database(policy))


def check_exit_code(findings: Iterable[Finding]) -> int:
    """0 when no finding is an error (the database is sound), else 1."""
    return 1 if any(f.severity == "error" for f in findings) else 0


def format_findings(findings: Sequence[Finding]) -> str:
    """Human-readable report: one block per finding, then a summary line."""
    lines: list[str] = []
    for finding in findings:
        lines.append(f"{finding.severity.upper()} [{finding.code}] {finding.message}")
        lines.append(f"    fix: {finding.fix}")
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(findings) - errors
    if errors:
        lines.append(
            f"{errors} error(s), {warnings} warning(s): the database is NOT safe for rls mode"
        )
    else:
        lines.append(f"no errors, {warnings} warning(s): the database is sound for rls mode")
    return "\n".join(lines)
