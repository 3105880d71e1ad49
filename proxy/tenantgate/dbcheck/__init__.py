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

The package's parts: :mod:`~tenantgate.dbcheck.catalog` (the catalog client),
:mod:`~tenantgate.dbcheck.policies` (judging RLS policies),
:mod:`~tenantgate.dbcheck.checker` (the checks per role) and
:mod:`~tenantgate.dbcheck.findings` (findings, exit code, report text).
"""

from __future__ import annotations

import asyncio

from tenantgate.config import Policy, UpstreamConfig
from tenantgate.dbcheck.catalog import CatalogClient, checked_oid
from tenantgate.dbcheck.checker import Checker, Role
from tenantgate.dbcheck.findings import Finding, Severity, check_exit_code, format_findings
from tenantgate.errors import UpstreamError
from tenantgate.upstream import connect

__all__ = [
    "Finding",
    "Severity",
    "check_database",
    "check_exit_code",
    "format_findings",
    "run_check",
]


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
    client = CatalogClient(conn)
    try:
        oid = await client.value("SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user")
        if oid is None:
            raise UpstreamError(f"role {user} is not in pg_roles")
        return await Checker(policy, client, Role(user, checked_oid(oid), tenants)).run(structural)
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
