"""Runs every case of the data-file corpus in tests/corpus/ through the analyser."""

from __future__ import annotations

from collections import Counter

import pytest
from analysis_corpus import POLICY, RLS_POLICY, Case, judge, load_cases

CASES = load_cases()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus_case(case: Case) -> None:
    verdict, rule = judge(case, POLICY, RLS_POLICY)
    assert verdict == case.verdict, f"{case.note}\n{case.sql}\nrule={rule}"
    if case.rule is not None and case.verdict == "rejected":
        assert rule == case.rule, f"{case.note}\n{case.sql}"


def test_corpus_shape() -> None:
    """Legit files hold only allowed cases; there are hundreds of adversarial ones."""
    counts: Counter[tuple[str, str]] = Counter()
    for case in CASES:
        legit = case.file.startswith("legit_")
        counts[("legit" if legit else "adversarial", case.verdict)] += 1
        if legit:
            assert case.verdict == "allowed", case.id
    assert counts[("adversarial", "rejected")] >= 300
    assert counts[("legit", "allowed")] >= 100


def test_every_rule_has_corpus_cases() -> None:
    rules = {c.rule for c in CASES if c.verdict == "rejected"}
    expected = {
        "parse_error",
        "statement_class",
        "setting_change",
        "setting_value",
        "denied_function",
        "catalog_view",
        "catalog_write",
        "temp_schema",
        "unknown_table",
        "shared_table_write",
        "missing_tenant_predicate",
        "alias_column_list",
        "insert_tenant_column",
        "tenant_column_update",
        "unproven_on_conflict",
        "wrong_tenant",
        "wrong_tenant_param",
    }
    assert expected <= rules, expected - rules
