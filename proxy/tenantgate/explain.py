"""``tenantgate explain``: the verdict for one SQL string, as a developer reads it.

Prints allowed/rejected with the rule and hint, per-statement facts, and in
rls/both mode the exact text the proxy would send upstream (with the tenant
injected).  Exit code 0 allowed, 1 rejected (contract).
"""

from __future__ import annotations

from pathlib import Path

from tenantgate.analysis import analyse_sql, check_tenant, explain_verdict
from tenantgate.config import load_policy
from tenantgate.enforcement import analysis_policy
from tenantgate.errors import ConfigError
from tenantgate.injection import TenantInjector


def explain_text(sql: str, policy_path: Path, tenant: str) -> tuple[str, bool]:
    """The report and whether the statement is allowed."""
    policy = load_policy(policy_path)
    if tenant not in policy.tenants:
        raise ConfigError(f"{policy_path}: tenants: no tenant {tenant!r} in the policy")
    analysis = analyse_sql(sql, analysis_policy(policy))
    rejection = check_tenant(analysis, tenant)
    lines = [f"mode: {policy.mode}", explain_verdict(analysis, tenant)]
    if rejection is None and policy.injects_tenant:
        injector = TenantInjector(policy.tenant_setting, tenant)
        text = injector.rewrite_query(sql.encode(), analysis.statements).text
        lines.append("sent upstream as a simple Query:")
        lines.append("  " + text.decode())
        lines.append(
            "extended protocol: the tenant is bound as a parameter of the internal "
            "statement `SELECT pg_catalog.set_config($1, $2, true)` before the first Execute "
            "of each transaction"
        )
    return "\n".join(lines), rejection is None


def explain(policy_path: Path, tenant: str, sql: str) -> int:
    report, allowed = explain_text(sql, policy_path, tenant)
    print(report)
    return 0 if allowed else 1
