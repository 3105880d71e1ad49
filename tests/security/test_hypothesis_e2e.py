"""Random SELECTs over orders/customers through the real proxy.

Each range-table entry gets a random predicate (right tenant, wrong tenant,
missing, OR-ed, IN list, cast, function, inequality, parameters bound to acme
or globex...), placed in WHERE or in a join's ON; shapes include self-joins,
outer joins, subqueries in FROM and in the SELECT list, and UNION arms.  Every
tenant column reached is returned (``t_*``).  Property: the statement is
rejected with 42501, or every returned tenant value is acme (NULL for the
nullable side of an outer join) and nothing else of another tenant shows up.

Runs in ``both`` mode and in ``enforce`` mode over an upstream with BYPASSRLS,
where the analyser is the only barrier.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from security_support import TENANT, LibpqClient, leaks

from support.db import TenantDb
from support.proxy import RunningProxy

pytestmark = [pytest.mark.security]

PREDICATES = (
    "right",
    "right_reversed",
    "right_param",
    "wrong",
    "wrong_param",
    "missing",
    "or_true",
    "or_other",
    "in_list",
    "cast",
    "lower",
    "not_other",
    "distinct",
    "coalesce",
)
# Mostly correct predicates, so that many statements are allowed and return rows.
PREDICATE_POOL = (*PREDICATES, "right", "right", "right", "right_param", "right_param", "right")
SHAPES = ("single", "comma", "join_on", "left_join", "self_join", "from_subquery", "scalar_sub")


@dataclass
class Builder:
    params: list[str] = field(default_factory=list)

    def param(self, value: str) -> str:
        self.params.append(value)
        return f"${len(self.params)}"

    def predicate(self, alias: str, kind: str) -> str | None:
        col = f"{alias}.tenant_id"
        match kind:
            case "right":
                return f"{col} = 'acme'"
            case "right_reversed":
                return f"'acme' = {col}"
            case "right_param":
                return f"{col} = {self.param('acme')}"
            case "wrong":
                return f"{col} = 'globex'"
            case "wrong_param":
                return f"{col} = {self.param('globex')}"
            case "missing":
                return None
            case "or_true":
                return f"({col} = 'acme' OR true)"
            case "or_other":
                return f"({col} = 'acme' OR {col} = 'initech')"
            case "in_list":
                return f"{col} IN ('acme', 'globex')"
            case "cast":
                return f"{col}::varchar = 'acme'"
            case "lower":
                return f"lower({col}) = 'acme'"
            case "not_other":
                return f"{col} <> 'globex'"
            case "distinct":
                return f"{col} IS NOT DISTINCT FROM 'acme'"
            case "coalesce":
                return f"coalesce({col} = 'acme', true)"
        raise AssertionError(kind)


def _where(conditions: list[str | None]) -> str:
    present = [c for c in conditions if c]
    return (" WHERE " + " AND ".join(present)) if present else ""


def _on(base: str, extra: str | None) -> str:
    return f"{base} AND {extra}" if extra else base


@st.composite
def statements(draw: st.DrawFn) -> tuple[str, list[str]]:
    shape = draw(st.sampled_from(SHAPES))
    kinds = draw(st.lists(st.sampled_from(PREDICATE_POOL), min_size=2, max_size=2))
    in_on = draw(st.booleans())
    b = Builder()
    p0, p1 = b.predicate("o", kinds[0]), None
    if shape == "single":
        sql = f"SELECT o.id, o.tenant_id AS t_o, o.secret FROM orders o{_where([p0])}"
    elif shape == "comma":
        p1 = b.predicate("c", kinds[1])
        sql = (
            "SELECT o.id, o.tenant_id AS t_o, c.tenant_id AS t_c, c.email "
            f"FROM orders o, customers c{_where([p0, p1])}"
        )
    elif shape in ("join_on", "left_join"):
        p1 = b.predicate("c", kinds[1])
        join = "JOIN" if shape == "join_on" else "LEFT JOIN"
        on = _on("c.id = o.customer_id OR true", p1 if in_on else None)
        sql = (
            "SELECT o.id, o.tenant_id AS t_o, c.tenant_id AS t_c, c.email, o.secret "
            f"FROM orders o {join} customers c ON {on}{_where([p0, None if in_on else p1])}"
        )
    elif shape == "self_join":
        p1 = b.predicate("o2", kinds[1])
        sql = (
            "SELECT o.id, o.tenant_id AS t_o, o2.tenant_id AS t_o2, o2.secret "
            f"FROM orders o JOIN orders o2 ON {_on('o2.id <> o.id', p1 if in_on else None)}"
            f"{_where([p0, None if in_on else p1])}"
        )
    elif shape == "from_subquery":
        p1 = b.predicate("c", kinds[1])
        inner = f"SELECT o.id, o.tenant_id, o.secret FROM orders o{_where([p0])}"
        sql = (
            "SELECT s.id, s.tenant_id AS t_s, s.secret, c.tenant_id AS t_c "
            f"FROM ({inner}) s JOIN customers c ON {_on('true', p1)}"
        )
    else:  # scalar_sub
        p1 = b.predicate("c", kinds[1])
        sub = (
            f"(SELECT c.tenant_id FROM customers c{_where([p1])} ORDER BY c.tenant_id DESC LIMIT 1)"
        )
        sql = f"SELECT o.id, o.tenant_id AS t_o, {sub} AS t_sub FROM orders o{_where([p0])}"
    if draw(st.booleans()):
        sql += " UNION ALL " + sql  # the same arm twice: each arm is checked
    return sql, b.params


@pytest.fixture(params=["both", "enforce"])
def proxy(request: pytest.FixtureRequest) -> RunningProxy:
    return request.getfixturevalue(f"proxy_{request.param}")  # type: ignore[no-any-return]


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(statement=statements())
def test_random_selects_never_leak(
    proxy: RunningProxy, security_db: TenantDb, statement: tuple[str, list[str]]
) -> None:
    sql, params = statement
    user = security_db.user(TENANT)
    with LibpqClient(proxy.dsn(user.name, user.password)) as client:
        out = client.extended(sql, params)
        event("rejected" if out.rejected else "error" if out.error else "allowed")
        assert not leaks("\n".join(out.texts), sql, params), (sql, params, out.texts[:20])
        if out.error is not None:
            assert out.rejected or out.error.get("C") != "42501", out.error
        for names, rows in out.results:
            tenant_columns = [i for i, name in enumerate(names) if name.startswith("t_")]
            for row in rows:
                for i in tenant_columns:
                    assert row[i] in (TENANT, None), (sql, params, names, row)
        assert client.usable()
