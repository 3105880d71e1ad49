"""Text shapes: an analysis found by the masked SQL text equals a fresh one.

The text level answers before any parse, so every way PostgreSQL's lexer
could read two texts of one key differently must end in a miss, never in a
borrowed analysis.  Each test learns texts in a cache and compares every
answer with ``analyse_sql``; the lexer traps (comments, dollar quotes,
``U&''``/``E''`` strings, signs, int4 overflow, continued strings) are spelled
out, the corpus supplies the breadth and hypothesis the rest.
"""

from __future__ import annotations

import pytest
from analysis_corpus import POLICY, RLS_POLICY, load_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast.parser import parse_sql_json
from test_shapes import through_one_cache, variants, verdicts

from tenantgate.analysis import AnalysisCache
from tenantgate.analysis.textshapes import literal_slots, text_key

CASES = load_cases()
BASE = "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 10"


def _cache_after(*texts: str) -> AnalysisCache:
    cache = AnalysisCache(POLICY)
    for sql in texts:
        verdicts(POLICY, sql, cache)
    return cache


def test_a_new_text_of_a_known_key_is_not_parsed() -> None:
    cache = _cache_after(BASE)
    assert len(cache.text_shapes) == 1
    other = "SELECT id FROM orders WHERE tenant_id = 'gbex' AND id = 77"
    verdicts(POLICY, other, cache)
    assert cache.text_shapes.hits == 1
    assert cache.get_or_analyse(other).statements[0].tenant_constants == {"gbex"}
    # Another length is another key: the parse-tree level answers instead.
    verdicts(POLICY, "SELECT id FROM orders WHERE tenant_id = 'globex' AND id = 7", cache)
    assert cache.text_shapes.hits == 1


def test_text_key_masks_only_standalone_literals() -> None:
    key = text_key("SELECT a1, 'x''y', -42, $1, 1.5, t.2, E'z', U&'w', 7e3 FROM t LIMIT 5")
    assert key is not None
    assert [m.group() for m in key[1]] == ["'x''y'", "-42", "5"]
    assert key[0] == (
        "SELECT a1, \x00s6\x00, \x00I3\x00, $1, 1.5, t.2, E'z', U&'w', 7e3 FROM t LIMIT \x00i1\x00"
    )
    assert text_key("SELECT 'é'") is None  # not ASCII: locations would not line up
    big = text_key("SELECT 2147483647, 2147483648, -2147483648")
    assert big is not None
    # int4 or numeric: PostgreSQL's choice (by the digits, before the minus is folded in).
    assert big[0] == "SELECT \x00i10\x00, \x00n10\x00, \x00N11\x00"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM orders WHERE tenant_id = 'acme' /* 'x' */ AND id = 1",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 1 -- 'x'",
        "SELECT id FROM orders WHERE tenant_id = $$acme$$ AND id = 1",
        "SELECT id FROM orders WHERE tenant_id = $q$ 'acme' $q$ AND id = 1",
        "SELECT id FROM orders WHERE tenant_id = 'ac'\n'me' AND id = 1",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = id -1",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = id--1\n",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id::float(10) = 1",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND \"x 1\" = 1",
    ],
)
def test_texts_whose_literals_the_tree_does_not_confirm_get_no_key(sql: str) -> None:
    key = text_key(sql)
    assert key is not None
    assert literal_slots(key, parse_sql_json(sql)) is None
    cache = _cache_after(sql)
    assert len(cache.text_shapes) == 0


def test_literal_slots_pair_each_constant_with_its_literal() -> None:
    sql = "INSERT INTO orders (item, tenant_id) VALUES ('book', 'acme')"
    key = text_key(sql)
    assert key is not None
    assert literal_slots(key, parse_sql_json(sql)) == [0, 1]
    sql = "SELECT id FROM orders WHERE id = 0 AND tenant_id = 'acme' AND id < 2147483648"
    key = text_key(sql)
    assert key is not None
    assert literal_slots(key, parse_sql_json(sql)) == [0, 1, 2]
    # The tree keeps OFFSET before LIMIT: pairing goes by location, not by order.
    sql = "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 1 LIMIT 2 OFFSET 3"
    key = text_key(sql)
    assert key is not None
    assert literal_slots(key, parse_sql_json(sql)) == [0, 1, 3, 2]
    # A sign the grammar folds into the constant pairs; the constant sits at the minus.
    sql = "UPDATE orders SET id = id + -5, item = -2147483648 WHERE tenant_id = -0"
    key = text_key(sql)
    assert key is not None
    assert literal_slots(key, parse_sql_json(sql)) == [0, 1, 2]


@pytest.mark.parametrize(
    ("learnt", "then"),
    [
        # A string's content may hold anything but a lone quote; the text stays one token.
        (BASE, "SELECT id FROM orders WHERE tenant_id = 'a''b' AND id = 10"),
        (BASE, "SELECT id FROM orders WHERE tenant_id = '\\'' AND id = 10"),
        (BASE, "SELECT id FROM orders WHERE tenant_id = '--ab' AND id = 10"),
        (BASE, "SELECT id FROM orders WHERE tenant_id = '/*ab' AND id = 10"),
        (BASE, "SELECT id FROM orders WHERE tenant_id = '$$ab' AND id = 10"),
        (BASE, "SELECT id FROM orders WHERE tenant_id = 'gbex' AND id = 00"),
        # A lone quote changes the literals, so the key.
        (BASE, "SELECT id FROM orders WHERE tenant_id = 'a' OR 'b' AND id = 10"),
        # Tenant values spelt as integers, and an integer past int4.
        (
            "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 2147483647",
            "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 2147483648",
        ),
        (
            "SELECT id FROM orders WHERE tenant_id = 1234 AND id = 1",
            "SELECT id FROM orders WHERE tenant_id = 0042 AND id = 1",
        ),
        (
            "SELECT id FROM orders WHERE tenant_id = -123 AND id = 1",
            "SELECT id FROM orders WHERE tenant_id = -000 AND id = 1",
        ),
        (
            "UPDATE orders SET id = id + -2147483648 WHERE tenant_id = 'acme'",
            "UPDATE orders SET id = id + -2147483647 WHERE tenant_id = 'acme'",
        ),
        (
            "UPDATE orders SET id = id + -5 WHERE tenant_id = 'acme'",
            "UPDATE orders SET id = id + -7 WHERE tenant_id = 'gbex'",
        ),
    ],
)
def test_same_key_texts_get_their_own_analysis(learnt: str, then: str) -> None:
    cache = _cache_after(learnt)
    verdicts(POLICY, then, cache)
    verdicts(POLICY, learnt, AnalysisCache(POLICY))


def test_corpus_variants_through_text_shapes() -> None:
    hits = 0
    for case in CASES:
        policy = RLS_POLICY if case.mode == "rls" else POLICY
        cache = AnalysisCache(policy)
        cache.get_or_analyse(case.sql)
        for variant in variants(case.sql):
            verdicts(policy, variant, cache)
        hits += cache.text_shapes.hits
    assert hits > 300  # the level is exercised, not bypassed


literal = st.one_of(
    st.text(alphabet="ac'\\-/*$e\n ", min_size=0, max_size=6).map(
        lambda s: "'" + s.replace("'", "''") + "'"
    ),
    st.text(alphabet="ac'\\-/*$e\n ", min_size=1, max_size=6),  # raw text between the holes
    st.integers(-3_000_000_000, 3_000_000_000).map(str),
    st.sampled_from(["'acme'", "'gbex'", "NULL", "-1", "E'acme'", "$$acme$$", "U&'acme'"]),
)
templates = st.sampled_from(
    [
        "SELECT id FROM orders WHERE tenant_id = {0} AND id = {1}",
        "SELECT id FROM orders WHERE tenant_id = {0}{1}",
        "SELECT id FROM orders WHERE tenant_id = {0} /* {1} */",
        "UPDATE orders SET item = {1} WHERE tenant_id = {0}",
        "INSERT INTO orders (item, tenant_id) VALUES ({1}, {0})",
        "SELECT id FROM orders WHERE id = {1} AND tenant_id = {0} LIMIT {1}",
        "UPDATE orders SET id = id -{1} WHERE tenant_id = {0}",
        "UPDATE orders SET id = id + {1} WHERE tenant_id = {0}",
    ]
)


@settings(max_examples=300, deadline=None)
@given(templates, st.lists(st.tuples(literal, literal), min_size=2, max_size=8))
def test_generated_texts_through_one_cache(template: str, pairs: list[tuple[str, str]]) -> None:
    through_one_cache(template, pairs)
