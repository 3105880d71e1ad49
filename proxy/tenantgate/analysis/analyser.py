"""Entry points: analyse a query string, check it against a tenant, explain it.

Owns :func:`analyse_sql` (tenant independent, so results can be cached by text
and shared), :func:`check_tenant` and :func:`explain_verdict`.
:func:`analyse_sql` never raises: any internal failure becomes a rejection
(``parse_error`` for unparseable text, ``internal_error`` otherwise).
"""

from __future__ import annotations

from .classes import classify
from .functions import FunctionRules
from .model import Analysis, AnalysisPolicy, Rejected, Rejection, StatementAnalysis
from .parse import parse_json, statements
from .relations import Resolver
from .walker import Walker

_EMPTY = Analysis((), None)


class CompiledPolicy:
    """A policy with its lookup structures built once."""

    __slots__ = ("functions", "policy", "resolver")

    def __init__(self, policy: AnalysisPolicy) -> None:
        self.policy = policy
        self.resolver = Resolver(policy)
        self.functions = FunctionRules(policy)


_compiled: dict[int, CompiledPolicy] = {}


def compile_policy(policy: AnalysisPolicy) -> CompiledPolicy:
    """The compiled form of ``policy`` (memoised by identity, a few entries)."""
    hit = _compiled.get(id(policy))
    if hit is not None and hit.policy is policy:
        return hit
    compiled = CompiledPolicy(policy)
    if len(_compiled) > 16:
        _compiled.clear()
    _compiled[id(policy)] = compiled
    return compiled


def analyse_sql(sql: str, policy: AnalysisPolicy | CompiledPolicy) -> Analysis:
    """Analyse every statement of ``sql``; never raises."""
    try:
        text = parse_json(sql)
    except Rejected as exc:
        return Analysis((), exc.rejection)
    return analyse_json(text, policy)


def analyse_json(text: str, policy: AnalysisPolicy | CompiledPolicy) -> Analysis:
    """Analyse every statement of a libpg_query JSON parse tree; never raises."""
    compiled = policy if isinstance(policy, CompiledPolicy) else compile_policy(policy)
    done: list[StatementAnalysis] = []
    try:
        raws = statements(text)
        if not raws:
            return _EMPTY
        for node, location, length in raws:
            walker = Walker(compiled.policy, compiled.resolver, compiled.functions)
            result = classify(node, walker)
            done.append(
                StatementAnalysis(
                    command=result.command,
                    tag=result.tag,
                    transaction=result.transaction,
                    location=location,
                    length=length,
                    tenant_constants=frozenset(walker.constants),
                    tenant_params=frozenset(walker.params),
                    statement_timeout_ms=result.timeout,
                    idle_in_transaction_timeout_ms=result.idle_timeout,
                    param_count=walker.max_param,
                )
            )
    except Rejected as exc:
        return Analysis(tuple(done), exc.rejection)
    except RecursionError:
        return Analysis(
            tuple(done),
            Rejection(
                "unsupported_construct",
                "the statement is nested too deeply",
                "simplify the statement",
            ),
        )
    except Exception:  # fail closed on anything unexpected
        return Analysis(
            tuple(done),
            Rejection(
                "internal_error",
                "the statement could not be analysed",
                "simplify the statement; report this to the tenantgate operator",
            ),
        )
    return Analysis(tuple(done), None)


WRONG_TENANT = Rejection(
    "wrong_tenant",
    "a tenant predicate or written tenant value names a different tenant",
    "use this session's tenant id (preferably as a $1 parameter)",
)


def check_tenant(analysis: Analysis, tenant: str) -> Rejection | None:
    """The analysis's own rejection, or wrong_tenant if a constant is not ``tenant``."""
    if analysis.rejection is not None:
        return analysis.rejection
    for statement in analysis.statements:
        for constant in statement.tenant_constants:
            if constant != tenant:
                return WRONG_TENANT
    return None


def explain_verdict(analysis: Analysis, tenant: str) -> str:
    """A human-readable multi-line verdict (for ``tenantgate explain``)."""
    rejection = check_tenant(analysis, tenant)
    lines: list[str] = []
    if rejection is None:
        lines.append("allowed")
    else:
        lines.append(f"rejected: tenantgate: {rejection.rule}: {rejection.message}")
        lines.append(f"hint: {rejection.hint}")
    for number, statement in enumerate(analysis.statements, 1):
        parts = [f"statement {number}: {statement.tag}"]
        if statement.transaction:
            parts.append(f"transaction={statement.transaction}")
        if statement.tenant_params:
            params = ", ".join(f"${n}" for n in sorted(statement.tenant_params))
            parts.append(f"parameters that must equal the tenant: {params}")
        if statement.tenant_constants:
            parts.append(f"{len(statement.tenant_constants)} tenant constant(s) checked")
        if statement.statement_timeout_ms is not None:
            parts.append(f"statement_timeout={statement.statement_timeout_ms}ms")
        lines.append("  " + "; ".join(parts))
    return "\n".join(lines)
