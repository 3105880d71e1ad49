"""The checks ``tenantgate check`` runs as one tenant-facing role.

What is checked is listed in :mod:`tenantgate.dbcheck`.
"""

# Catalog queries interpolate only oids read from the catalogs (checked to be digits)
# and names quoted by quote_literal / quote_ident:
# ruff: noqa: S608

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from tenantgate.config import Policy
from tenantgate.dbcheck.catalog import (
    CatalogClient,
    Row,
    checked_oid,
    is_true,
    relation_name,
)
from tenantgate.dbcheck.findings import Finding, Severity
from tenantgate.dbcheck.policies import judge_policies, policies_of
from tenantgate.rlssql import quote_ident, quote_literal, quote_qualified

_TRUE_OPTIONS = frozenset({"true", "on", "yes", "1"})
_DANGEROUS_PRIVILEGES = ("TRUNCATE", "REFERENCES", "TRIGGER")
_ANY_PRIVILEGE = "SELECT,INSERT,UPDATE,DELETE,TRUNCATE,REFERENCES,TRIGGER"
_WRITE_PRIVILEGES = "INSERT,UPDATE,DELETE,TRUNCATE"
# Memberships reported as stats_readable rather than role_member_of_role.
_STATS_ROLES = "'pg_read_all_stats', 'pg_monitor'"


@dataclass(slots=True)
class Role:
    name: str
    oid: str
    tenants: list[str]


class Checker:
    def __init__(self, policy: Policy, client: CatalogClient, role: Role) -> None:
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
        superuser, bypass, createrole, stats = (is_true(v) for v in rows[0])
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
        value = await self.client.value(
            f"SELECT pg_catalog.current_setting({quote_literal(setting)}, true)"
        )
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
            f"  AND a.attname = {quote_literal(column)} AND a.attnum > 0 AND NOT a.attisdropped) "
            "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE c.oid = pg_catalog.to_regclass({quote_literal(quote_qualified(table))})"
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
        oid = checked_oid(raw_oid)
        qtable = relation_name(schema, name)
        if structural and not is_true(has_column):
            self.add(
                "error",
                "tenant_column_missing",
                f"table {qtable} has no column {column} (its tenant column in the policy)",
                f"ALTER TABLE {qtable} ADD COLUMN {quote_ident(column)} text NOT NULL;  "
                "(or correct the column in the policy file)",
            )
        await self._rls_table(
            oid, qtable, column, is_true(enabled), is_true(forced), structural=structural
        )
        if is_true(owns):
            self._owner_finding(qtable, owner or "")
        oids = [oid]
        for child in await self.client.rows(
            "WITH RECURSIVE ch(oid) AS ("
            f" SELECT inhrelid FROM pg_catalog.pg_inherits WHERE inhparent = {oid}::oid"
            " UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i"
            " JOIN ch ON i.inhparent = ch.oid)"
            " SELECT c.oid, n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity,"
            f" pg_catalog.has_table_privilege({role_oid}::oid, c.oid,"
            f" {quote_literal(_ANY_PRIVILEGE)}),"
            f" pg_catalog.pg_has_role({role_oid}::oid, c.relowner, 'MEMBER'),"
            " pg_catalog.pg_get_userbyid(c.relowner)"
            " FROM ch JOIN pg_catalog.pg_class c ON c.oid = ch.oid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace ORDER BY 2, 3"
        ):
            await self._child(child, qtable, column)
            oids.append(checked_oid(child[0]))
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
        policies = await policies_of(self.client, oid, self.role.oid)
        policy_findings = judge_policies(
            policies, qtable, self.role.name, self.policy.tenant_setting, column
        )
        self.findings.extend(policy_findings)
        privileges = await self.client.rows(
            "SELECT "
            + ", ".join(
                f"pg_catalog.has_table_privilege({self.role.oid}::oid, {oid}::oid,"
                f" {quote_literal(p)})"
                for p in _DANGEROUS_PRIVILEGES
            )
        )
        for privilege, granted in zip(_DANGEROUS_PRIVILEGES, privileges[0], strict=True):
            if is_true(granted) and not self.superuser:
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
        qchild = relation_name(schema, name)
        if self.superuser:
            return
        if is_true(owns):
            self._owner_finding(qchild, owner or "")
        if not is_true(privileged):
            return  # reachable only through the parent, whose policies apply
        checker = Checker(self.policy, self.client, self.role)
        covered = await checker._rls_table(
            checked_oid(oid), qchild, column, is_true(enabled), is_true(forced), structural=True
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
            f"  pg_catalog.has_table_privilege({self.role.oid}::oid, c.oid, "
            f"{quote_literal(_ANY_PRIVILEGE)})"
            " FROM v JOIN pg_catalog.pg_class c ON c.oid = v.oid"
            " JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace ORDER BY 1, 2"
        )
        for schema, name, kind, invoker, privileged in rows:
            qview = relation_name(schema, name)
            usable = is_true(privileged) and not self.superuser
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
            f"{quote_literal(_WRITE_PRIVILEGES)}) "
            "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            f"WHERE c.oid = pg_catalog.to_regclass({quote_literal(quote_qualified(table))})"
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
        if is_true(writable) and not self.superuser:
            qtable = relation_name(schema, name)
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
