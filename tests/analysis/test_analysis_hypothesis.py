"""Property tests: the analyser never raises, and never allows an unproven entry.

The second property builds random SELECT trees (joins of every kind, FROM
subqueries, EXISTS subqueries, CTEs, set operations) over the corpus tables.
For every scoped range entry the generator picks where (and whether) to put
its tenant predicate -- right, wrong tenant, OR-ed, in a sub-level, on the
preserved side of an outer join, on another alias -- and keeps its own record
of whether that entry received a valid same-level proof.  That record is the
oracle; the analyser's verdict must match it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from analysis_corpus import POLICY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantgate.analysis import analyse_sql, check_tenant

SCOPED = ("orders", "customers", "billing.invoices")
SHARED = ("plans",)


@given(st.text(max_size=300))
@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
def test_never_raises_on_text(text: str) -> None:
    analysis = analyse_sql(text, POLICY)
    assert analysis.rejection is None or analysis.rejection.rule


_SQLISH = st.lists(
    st.sampled_from(
        [
            "SELECT",
            "*",
            "FROM",
            "orders",
            "o",
            "WHERE",
            "tenant_id",
            "=",
            "'acme'",
            "OR",
            "AND",
            "true",
            "(",
            ")",
            ",",
            ";",
            "UNION",
            "WITH",
            "x",
            "AS",
            "JOIN",
            "LEFT",
            "ON",
            "$1",
            "o.tenant_id",
            "set_config",
            "'globex'",
            "::text",
            "--",
            "/*",
            "*/",
            "E'\\x41'",
            "$$",
            "INSERT",
            "INTO",
            "VALUES",
            "UPDATE",
            "SET",
            "DELETE",
            "LATERAL",
            "EXISTS",
            "SELECT 1",
        ]
    ),
    max_size=30,
).map(" ".join)


@given(_SQLISH)
@settings(max_examples=400)
def test_never_raises_on_sqlish_text(text: str) -> None:
    analyse_sql(text, POLICY)


# --------------------------------------------------------------------- generator
@dataclass
class Entry:
    alias: str
    scoped: bool
    proven: bool = False


@dataclass
class Join:
    kind: str
    left: object
    right: object
    quals: list[str] = field(default_factory=lambda: ["true"])


JoinInfo = tuple[Join, list[Entry], list[Entry]]


@dataclass
class Sub:
    sql: str
    alias: str


class Builder:
    """Draws one random statement and its oracle verdict."""

    def __init__(self, draw: st.DrawFn) -> None:
        self.draw = draw
        self.names = itertools.count()
        self.ok = True

    def alias(self, prefix: str) -> str:
        return f"{prefix}{next(self.names)}"

    def statement(self, depth: int) -> str:
        kinds = ["level", "level", "union", "cte"] if depth else ["level"]
        kind = self.draw(st.sampled_from(kinds))
        if kind == "union":
            op = self.draw(st.sampled_from(["UNION", "UNION ALL", "INTERSECT", "EXCEPT"]))
            return f"{self.level(depth - 1)} {op} {self.level(depth - 1)}"
        if kind == "cte":
            name = self.alias("cte")
            body = self.statement(depth - 1)
            main = self.level(depth - 1, extra_from=[name])
            return f"WITH {name} AS ({body}) {main}"
        return self.level(depth)

    def from_item(
        self,
        depth: int,
        entries: list[Entry],
        joins: list[JoinInfo],
    ) -> tuple[object, list[Entry]]:
        kinds = ["scoped", "scoped", "shared", "sub", "join", "join"]
        choice = self.draw(st.sampled_from(kinds if depth else ["scoped", "shared"]))
        if choice == "scoped":
            entry = Entry(self.alias("t"), True)
            entries.append(entry)
            table = self.draw(st.sampled_from(SCOPED))
            return f"{table} {entry.alias}", [entry]
        if choice == "shared":
            entry = Entry(self.alias("p"), False)
            entries.append(entry)
            return f"{SHARED[0]} {entry.alias}", [entry]
        if choice == "sub":
            alias = self.alias("s")
            lateral = self.draw(st.booleans())
            inner = self.statement(depth - 1)
            entries.append(Entry(alias, False))
            return Sub(f"{'LATERAL ' if lateral else ''}({inner}) {alias}", alias), [entries[-1]]
        left, left_entries = self.from_item(depth - 1, entries, joins)
        right, right_entries = self.from_item(depth - 1, entries, joins)
        join = Join(
            self.draw(st.sampled_from(["JOIN", "LEFT JOIN", "RIGHT JOIN", "FULL JOIN"])),
            left,
            right,
        )
        joins.append((join, left_entries, right_entries))
        return join, left_entries + right_entries

    def render(self, item: object) -> str:
        if isinstance(item, str):
            return item
        if isinstance(item, Sub):
            return item.sql
        assert isinstance(item, Join)
        return (
            f"({self.render(item.left)} {item.kind} {self.render(item.right)} "
            f"ON {' AND '.join(item.quals)})"
        )

    def level(self, depth: int, extra_from: list[str] | None = None) -> str:
        entries: list[Entry] = []
        joins: list[JoinInfo] = []
        items = [
            self.from_item(depth, entries, joins)[0] for _ in range(self.draw(st.integers(1, 2)))
        ]
        where: list[str] = []
        others = [e for e in entries if not e.scoped]
        for entry in [e for e in entries if e.scoped]:
            placement = self.draw(
                st.sampled_from(
                    [
                        "where",
                        "where",
                        "param",
                        "on",
                        "on",
                        "none",
                        "wrong",
                        "or",
                        "sub",
                        "other_alias",
                    ]
                )
            )
            pred = f"{entry.alias}.tenant_id = 'acme'"
            if placement == "where":
                where.append(pred)
                entry.proven = True
            elif placement == "param":
                where.append(f"{entry.alias}.tenant_id = $1")
                entry.proven = True
            elif placement == "wrong":
                where.append(f"{entry.alias}.tenant_id = 'globex'")
                self.ok = False
            elif placement == "or":
                where.append(f"({pred} OR {entry.alias}.id > 0)")
            elif placement == "sub":
                where.append(f"EXISTS (SELECT 1 WHERE {pred})")
            elif placement == "other_alias" and others:
                where.append(f"{self.draw(st.sampled_from(others)).alias}.id = 1")
            elif placement == "on":
                holders = [(j, lft, rgt) for j, lft, rgt in joins if entry in lft or entry in rgt]
                if holders:
                    join, left, right = self.draw(st.sampled_from(holders))
                    join.quals.append(pred)
                    constrained = {
                        "JOIN": left + right,
                        "LEFT JOIN": right,
                        "RIGHT JOIN": left,
                        "FULL JOIN": [],
                    }[join.kind]
                    entry.proven = any(e is entry for e in constrained)
        if depth and self.draw(st.booleans()):
            where.append(f"EXISTS ({self.statement(depth - 1)})")
        for entry in entries:
            if entry.scoped and not entry.proven:
                self.ok = False
        from_sql = ", ".join([self.render(i) for i in items] + (extra_from or []))
        sql = f"SELECT 1 FROM {from_sql}"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return sql


@st.composite
def statements(draw: st.DrawFn) -> tuple[str, bool]:
    builder = Builder(draw)
    sql = builder.statement(draw(st.integers(0, 3)))
    return sql, builder.ok


@given(statements())
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_verdict_matches_oracle(case: tuple[str, bool]) -> None:
    sql, ok = case
    analysis = analyse_sql(sql, POLICY)
    rejection = check_tenant(analysis, "acme")
    allowed = rejection is None
    # Soundness: never allow a statement with an unproven entry or a wrong tenant.
    assert not (allowed and not ok), f"allowed but unproven: {sql}"
    # Completeness for the forms generated: proven statements are allowed.
    assert not (ok and not allowed), f"rejected ({rejection}) but proven: {sql}"
