"""Micro-benchmarks of the SQL analyser (not part of the test suite).

Run: ``.venv/bin/python -m pytest benchmarks/test_analysis_speed.py --benchmark-only``
Targets: cached lookup <= 5 us; uncached parse + analysis fast enough for
~10k statements/s through the proxy.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))

from tenantgate.analysis import (
    AnalysisCache,
    AnalysisPolicy,
    analyse_sql,
    check_tenant,
    compile_policy,
    normalize,
)

POLICY = AnalysisPolicy(
    scoped_tables={
        "orders": "tenant_id",
        "customers": "tenant_id",
        "billing.invoices": "tenant_id",
    },
    shared_tables=frozenset({"plans"}),
)

STATEMENTS = {
    "point_select": "SELECT id, item, amount FROM orders WHERE tenant_id = $1 AND id = $2",
    "join_page": (
        "SELECT o.id, o.item, c.name FROM orders o JOIN customers c ON c.id = o.customer_id "
        "AND c.tenant_id = $1 WHERE o.tenant_id = $1 AND o.status = $2 "
        "ORDER BY o.created_at DESC LIMIT $3 OFFSET $4"
    ),
    "cte_agg": (
        "WITH t AS (SELECT customer_id, sum(amount) AS s FROM orders WHERE tenant_id = $1 "
        "GROUP BY customer_id) SELECT c.name, t.s FROM t JOIN customers c ON c.id = "
        "t.customer_id WHERE c.tenant_id = $1 ORDER BY t.s DESC LIMIT 10"
    ),
    "insert": (
        "INSERT INTO orders (tenant_id, item, amount) VALUES ($1, $2, $3) RETURNING id, created_at"
    ),
    "update": "UPDATE orders SET status = $2 WHERE tenant_id = $1 AND id = $3",
    "begin": "BEGIN",
}


@pytest.mark.parametrize("name", list(STATEMENTS))
def test_uncached_analysis(benchmark: Any, name: str) -> None:
    compiled = compile_policy(POLICY)
    sql = STATEMENTS[name]
    result = benchmark(analyse_sql, sql, compiled)
    assert result.rejection is None


@pytest.mark.parametrize("name", ["point_select", "join_page", "cte_agg"])
def test_cached_lookup(benchmark: Any, name: str) -> None:
    cache = AnalysisCache(POLICY, maxsize=1000)
    sql = STATEMENTS[name]
    cache.get_or_analyse(sql)

    def lookup() -> None:
        check_tenant(cache.get_or_analyse(sql), "acme")

    benchmark(lookup)
    assert cache.hits > 0


def _new_texts(template: str) -> Iterator[str]:
    return itertools.cycle([template.format(n) for n in range(100_000, 200_000)])


def test_text_shape_hit(benchmark: Any) -> None:
    """A text never seen before whose text shape is known (W4: literals inlined, each
    text unique): answered from the masked text, no parse."""
    cache = AnalysisCache(POLICY, maxsize=1000)
    texts = _new_texts("SELECT id, item, amount FROM orders WHERE tenant_id = 'acme' AND id = {}")
    cache.get_or_analyse(next(texts))

    def lookup() -> None:
        check_tenant(cache.get_or_analyse(next(texts)), "acme")

    benchmark(lookup)
    assert cache.text_shapes.hits > 0


def test_tree_shape_hit(benchmark: Any) -> None:
    """The same, for a text the text level cannot take (a number in a comment never
    pairs with a constant): parsed, then answered by its parse-tree shape."""
    cache = AnalysisCache(POLICY, maxsize=1000)
    texts = _new_texts(
        "SELECT id, item, amount FROM orders WHERE tenant_id = 'acme' AND id = {0} /* 1 */"
    )
    cache.get_or_analyse(next(texts))

    def lookup() -> None:
        check_tenant(cache.get_or_analyse(next(texts)), "acme")

    benchmark(lookup)
    assert cache.shapes.hits > 0
    assert cache.text_shapes.hits == 0


def test_normalize(benchmark: Any) -> None:
    benchmark(normalize, STATEMENTS["join_page"])
