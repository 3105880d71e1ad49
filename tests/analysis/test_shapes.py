"""Shapes: an analysis reused for a text that differs only in constants equals a fresh one.

For every statement of the corpus (adversarial and legitimate, enforce and
rls policies) and for variants of it with other constants (another tenant's
id, the tenant's id where something else was, other numbers of the same and
other lengths, NULL), a cache that has learnt the original must give the
variant exactly the analysis ``analyse_sql`` gives it, and therefore the
same verdict for every tenant.  Plus hypothesis over generated predicates.
"""

from __future__ import annotations

import re

import pytest
from analysis_corpus import POLICY, RLS_POLICY, load_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast.parser import parse_sql_json

from tenantgate.analysis import AnalysisCache, AnalysisPolicy, analyse_sql, check_tenant
from tenantgate.analysis.shapes import constants_of, shape_key

CASES = load_cases()
_STRING = re.compile(r"(?<![\w$&])'(?:[^']|'')*'")  # a plain '...' literal (no E/U&/B/X prefix)
_NUMBER = re.compile(r"(?<![\w$.])\d+(?![\w.])")
TENANTS = ("acme", "globex")


def variants(sql: str) -> list[str]:
    """``sql`` with its plain literals swapped for others, one kind of swap at a time."""
    out = []
    for replacement in ("'globex'", "'acme'", "'x''y'", "NULL", "'ac me'"):
        out.append(_STRING.sub(replacement, sql))
    out.append(_STRING.sub(lambda m: "'globex'" if m.group() == "'acme'" else m.group(), sql))
    for number in ("7", "123456789", "0", "00042"):
        out.append(_NUMBER.sub(number, sql))
    # Same lengths, so the variant has the original's shape: these take the shape path.
    out.append(_STRING.sub(lambda m: "'" + "z" * (len(m.group()) - 2) + "'", sql))
    out.append(_STRING.sub(lambda m: "'acme'" if len(m.group()) == 6 else m.group(), sql))
    out.append(_STRING.sub(lambda m: "'gbex'" if m.group() == "'acme'" else m.group(), sql))
    out.append(_NUMBER.sub(lambda m: "9" * len(m.group()), sql))
    out.append(_NUMBER.sub(lambda m: "0" * len(m.group()), sql))
    return [v for v in dict.fromkeys(out) if v != sql]


def verdicts(policy: AnalysisPolicy, sql: str, cache: AnalysisCache) -> None:
    """The cache's analysis of ``sql`` is exactly the fresh one."""
    fresh = analyse_sql(sql, policy)
    cached = cache.get_or_analyse(sql)
    assert cached == fresh, sql
    for tenant in TENANTS:
        assert check_tenant(cached, tenant) == check_tenant(fresh, tenant)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_corpus_variants_get_the_fresh_analysis(case: object) -> None:
    sql = case.sql  # type: ignore[attr-defined]
    policy = RLS_POLICY if case.mode == "rls" else POLICY  # type: ignore[attr-defined]
    cache = AnalysisCache(policy)
    cache.get_or_analyse(sql)  # learn the original's shape (if it has one)
    for variant in variants(sql):
        verdicts(policy, variant, cache)


def test_shapes_are_used_and_refuse_other_tenants() -> None:
    cache = AnalysisCache(POLICY)
    first = "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 10"
    cache.get_or_analyse(first)
    assert len(cache.shapes) == 1
    # Constants of the same lengths: the same shape (locations are part of it).  The
    # lower-case keyword keeps the text level (textshapes) from answering first.
    other = cache.get_or_analyse("SELECT id FROM orders where tenant_id = 'gbex' AND id = 11")
    assert cache.shapes.hits == 1
    assert cache.text_shapes.hits == 0
    assert check_tenant(other, "acme") is not None
    assert check_tenant(other, "gbex") is None
    # Same shape but NULL where the tenant was: another kind of constant, another shape.
    null = cache.get_or_analyse("SELECT id FROM orders WHERE tenant_id = NULL   AND id = 12")
    assert null.rejection is not None
    assert cache.shapes.hits == 1


def test_what_never_gets_a_shape() -> None:
    cache = AnalysisCache(POLICY)
    for sql in (
        "SET statement_timeout = 500",  # settings: their values are checked
        "SELECT id FROM orders WHERE tenant_id = '042'::int",  # a cast normalises the value
        "SELECT id FROM orders",  # refused
        "SELECT 1; SELECT 2",  # several statements
        "BEGIN",
    ):
        cache.get_or_analyse(sql)
    assert cache.shapes.hits == 0
    assert all(not hasattr(v, "statement") for v in cache.shapes._entries.values())
    # The cast case: a variant with the canonical tenant id is judged in full, correctly.
    sql = "SELECT id FROM orders WHERE tenant_id = '42'::int"
    assert cache.get_or_analyse(sql) == analyse_sql(sql, POLICY)


def test_shape_key_ignores_only_constant_values() -> None:
    def key(sql: str) -> str:
        return shape_key(parse_sql_json(sql))

    assert key("SELECT a FROM t WHERE x = 'p'") == key("SELECT a FROM t WHERE x = 'q'")
    assert key("SELECT a FROM t WHERE x = 'p'") != key("SELECT a FROM t WHERE x = 1")
    assert key("SELECT a FROM t WHERE x = 'p'") != key("SELECT a FROM t WHERE y = 'p'")
    assert key("SELECT a FROM t WHERE x = 'p'") != key("SELECT a FROM t WHERE x = NULL")
    assert key("SELECT a FROM t WHERE x = 'p'") != key("SELECT b FROM t WHERE x = 'p'")
    # A literal that spells JSON is a value like any other.
    tricky = '{"A_Const":{"ival":{"ival":1},"location":1}}'
    assert len(constants_of(parse_sql_json(f"SELECT '{tricky}'"))) == 1


values = st.one_of(
    st.sampled_from(["'acme'", "'gbex'", "'globex'", "''", "'a''b'", "NULL", "0", "1", "42", "-1"]),
    # Four characters, so texts of one template often share a shape.
    st.text(alphabet="acmegbx'\\\"{}:", min_size=4, max_size=4).map(
        lambda s: "'" + s.replace("'", "''") + "'"
    ),
    st.integers(1000, 9999).map(str),
    st.integers(-(10**12), 10**12).map(str),
)
templates = st.sampled_from(
    [
        "SELECT id FROM orders WHERE tenant_id = {0} AND id = {1}",
        "SELECT id FROM orders WHERE id = {1} AND tenant_id = {0}",
        "UPDATE orders SET item = {1} WHERE tenant_id = {0}",
        "DELETE FROM orders WHERE tenant_id = {0} AND item = {1}",
        "INSERT INTO orders (tenant_id, item) VALUES ({0}, {1})",
        "INSERT INTO orders (item, tenant_id) VALUES ({1}, {0})",
        "SELECT o.id FROM orders o JOIN customers c ON c.tenant_id = {0} WHERE o.tenant_id = {1}",
        "SELECT id FROM orders WHERE tenant_id = {0}::text AND id > {1} LIMIT {1}",
        "SELECT id FROM orders WHERE tenant_id = {0} OR id = {1}",
        "SELECT {0}, {1} FROM plans",
    ]
)


@settings(max_examples=300, deadline=None)
@given(templates, st.lists(st.tuples(values, values), min_size=2, max_size=6))
def test_generated_texts_of_one_shape(template: str, pairs: list[tuple[str, str]]) -> None:
    through_one_cache(template, pairs)


def through_one_cache(template: str, pairs: list[tuple[str, str]]) -> None:
    """Each pair's text through one cache: every answer is the fresh analysis."""
    cache = AnalysisCache(POLICY)
    for a, b in pairs:
        verdicts(POLICY, template.format(a, b), cache)
