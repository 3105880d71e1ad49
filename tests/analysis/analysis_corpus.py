"""Loading and judging the data-file corpus in tests/corpus/ (shared by tests and reports)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tenantgate.analysis import (
    Analysis,
    AnalysisPolicy,
    analyse_sql,
    check_tenant,
    tenant_param_matches,
)

POLICY = AnalysisPolicy(
    scoped_tables={
        "orders": "tenant_id",
        "customers": "tenant_id",
        "billing.invoices": "tenant_id",
    },
    shared_tables=frozenset({"plans"}),
)
RLS_POLICY = AnalysisPolicy(
    scoped_tables=POLICY.scoped_tables,
    shared_tables=POLICY.shared_tables,
    check_predicates=False,
)
CORPUS_DIR = Path(__file__).resolve().parents[1] / "corpus"
TENANT = "acme"


@dataclass(frozen=True)
class Case:
    file: str
    index: int
    sql: str
    verdict: str
    rule: str | None
    note: str
    params: tuple[str | None, ...] | None
    mode: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.index}"


def load_cases() -> list[Case]:
    cases: list[Case] = []
    for path in sorted(CORPUS_DIR.glob("*.yaml")):
        doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
        defaults = doc.get("defaults") or {}
        for index, raw in enumerate(doc["cases"]):
            item = {**defaults, **raw}
            params = item.get("params")
            cases.append(
                Case(
                    file=path.name,
                    index=index,
                    sql=str(item["sql"]),
                    verdict=str(item["verdict"]),
                    rule=item.get("rule"),
                    note=str(item.get("note", "")),
                    params=tuple(params) if params is not None else None,
                    mode=str(item.get("mode", "enforce")),
                )
            )
    return cases


def judge(case: Case, policy: AnalysisPolicy, rls_policy: AnalysisPolicy) -> tuple[str, str | None]:
    """(verdict, rule) the analyser gives the case as tenant acme."""
    analysis: Analysis = analyse_sql(case.sql, rls_policy if case.mode == "rls" else policy)
    rejection = check_tenant(analysis, TENANT)
    if rejection is not None:
        return "rejected", rejection.rule
    if case.params is not None:
        for statement in analysis.statements:
            for number in statement.tenant_params:
                value = case.params[number - 1] if number <= len(case.params) else None
                raw = value.encode() if value is not None else None
                if not tenant_param_matches(raw, False, 0, TENANT):
                    return "rejected", "wrong_tenant_param"
    return "allowed", None
