"""INSERT / UPDATE / DELETE rules (the write paths of the escape catalogue).

Owns target-table rules and the tenant column's written values:

* A write target must be a scoped table (or an unknown one when
  ``unknown_tables: allow``); shared tables -> ``shared_table_write``; catalog
  and information_schema -> ``catalog_write``.  DML targets never resolve to
  CTE names (Postgres does not either).
* INSERT into a scoped table must list the tenant column, and every row must
  write a tenant value there (see :mod:`.predicates`): each VALUES row, each
  arm's SELECT-list expression for INSERT ... SELECT, or -- SQLAlchemy's
  "insertmanyvalues" form -- a column of a single ``(VALUES ...) AS a(p0, ...)``
  FROM item whose every row holds a tenant value.  DEFAULT, DEFAULT VALUES and
  a missing column list are refused (``insert_tenant_column``).
* ON CONFLICT DO NOTHING is fine.  ON CONFLICT DO UPDATE may hit a row of
  *another* tenant with the same key, so it needs a proof conjunct
  ``<target>.<tenant col> = <tenant value>`` in the DO UPDATE ... WHERE
  (qualified by the target's name or alias), and must not assign the tenant
  column; otherwise ``unproven_on_conflict``.
* UPDATE: target + FROM entries form one level proven by the WHERE;
  ``SET tenant_col = X`` only with X a tenant value (recorded); multi-column
  assignment or subscripts on the tenant column are refused
  (``tenant_column_update``).  DELETE: target + USING entries, same rule.
* With ``check_predicates`` off (pure rls mode) only the target rules apply.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .entries import Entry, check_readable
from .model import Rejected
from .predicates import TenantValue, column_fields, tenant_value
from .relations import Resolved, display

if TYPE_CHECKING:
    from .walker import Scope, Walker

Node = dict[str, Any]


def target(walker: Walker, rv: Node) -> Entry:
    """Resolve a DML target and refuse targets tenants may not write."""
    schema = rv.get("schemaname")
    name = str(rv.get("relname", ""))
    resolved = walker.resolver.resolve(schema, name)
    check_readable(resolved, walker.resolver)
    if resolved.kind == "catalog":
        raise Rejected(
            "catalog_write",
            f"writing {resolved.name} is not allowed",
            "system catalogs and information_schema are read-only",
        )
    if resolved.kind == "shared":
        raise Rejected(
            "shared_table_write",
            f"{display(resolved)} is shared by all tenants and read-only",
            "shared tables can only be changed by the operator",
        )
    alias = rv.get("alias") or {}
    return Entry(alias.get("aliasname") or name, resolved, schema, bool(alias))


def _walk_rest(walker: Walker, node: Node, scope: Scope, skip: tuple[str, ...]) -> None:
    for key, value in node.items():
        if key not in skip and isinstance(value, (dict, list)):
            walker.walk(value, scope)


def insert(walker: Walker, node: Node, scope: Scope) -> None:
    """Analyse an InsertStmt."""
    if node.get("withClause"):
        scope = walker.with_clause(node["withClause"], scope)
    entry = target(walker, node.get("relation", {}))
    resolved = entry.resolved
    source = (node.get("selectStmt") or {}).get("SelectStmt")
    if walker.check and resolved is not None and resolved.kind == "scoped":
        col = resolved.tenant_column
        name = display(resolved)
        names = [c.get("ResTarget", {}) for c in node.get("cols", [])]
        index = next(
            (i for i, c in enumerate(names) if c.get("name") == col and not c.get("indirection")),
            None,
        )
        if index is None or source is None:
            raise Rejected(
                "insert_tenant_column",
                f"INSERT into {name} must list {col} and give its value",
                f"list {col} in the column list of INSERT INTO {name} and "
                "give it the value $1 (this tenant) in every row",
            )
        for value in _source_values(source, index, name, col):
            walker.record(value)
        _on_conflict(walker, node.get("onConflictClause"), entry, resolved)
    _walk_rest(walker, node, scope, ("relation", "withClause"))


def _bad_insert_value(name: str, col: str) -> Rejected:
    return Rejected(
        "insert_tenant_column",
        f"every row inserted into {name} must set {col} to a constant or parameter",
        f"give {col} the value $1 (this tenant) in every row; DEFAULT and "
        "expressions are not accepted",
    )


def _source_values(source: Node, index: int, name: str, col: str) -> list[TenantValue]:
    """The tenant values an INSERT source writes into column ``index``."""
    if source.get("op", "SETOP_NONE") != "SETOP_NONE":
        out: list[TenantValue] = []
        for arm in ("larg", "rarg"):
            body = source.get(arm, {})  # bare SelectStmt bodies in the JSON
            out.extend(_source_values(body.get("SelectStmt", body), index, name, col))
        return out
    rows = source.get("valuesLists")
    if rows is not None:
        return [_row_value(row, index, name, col) for row in rows]
    targets = source.get("targetList", [])
    if index >= len(targets):
        raise _bad_insert_value(name, col)
    expr = targets[index].get("ResTarget", {}).get("val", {})
    value = tenant_value(expr)
    if value is not None:
        return [value]
    return _sentinel_values(source, expr, name, col)


def _row_value(row: Node, index: int, name: str, col: str) -> TenantValue:
    items = row.get("List", {}).get("items", [])
    if index >= len(items):
        raise _bad_insert_value(name, col)
    value = tenant_value(items[index])
    if value is None:
        raise _bad_insert_value(name, col)
    return value


def _sentinel_values(source: Node, expr: Node, name: str, col: str) -> list[TenantValue]:
    """SQLAlchemy insertmanyvalues: SELECT p0::T ... FROM (VALUES ...) AS imp_sen(p0, ...)."""
    cast = expr.get("TypeCast")
    if cast is not None:
        if tenant_value({"TypeCast": {**cast, "arg": {"ParamRef": {"number": 1}}}}) is None:
            raise _bad_insert_value(name, col)
        expr = cast.get("arg", {})
    fields = column_fields(expr)
    froms = source.get("fromClause", [])
    if fields is None or len(froms) != 1 or "RangeSubselect" not in froms[0]:
        raise _bad_insert_value(name, col)
    sub = froms[0]["RangeSubselect"]
    alias = sub.get("alias") or {}
    colnames = [c.get("String", {}).get("sval") for c in alias.get("colnames", [])]
    if len(fields) == 2 and fields[0] != alias.get("aliasname"):
        raise _bad_insert_value(name, col)
    if len(fields) not in (1, 2) or colnames.count(fields[-1]) != 1:
        raise _bad_insert_value(name, col)
    values = sub.get("subquery", {}).get("SelectStmt", {})
    rows = values.get("valuesLists")
    if rows is None or sub.get("lateral") or values.get("withClause"):
        raise _bad_insert_value(name, col)
    position = colnames.index(fields[-1])
    return [_row_value(row, position, name, col) for row in rows]


def _on_conflict(walker: Walker, clause: Node | None, entry: Entry, resolved: Resolved) -> None:
    if not clause:
        return
    action = clause.get("action")
    if action == "ONCONFLICT_NOTHING":
        return
    name, col = display(resolved), resolved.tenant_column
    hint = (
        f"add WHERE {entry.refname}.{col} = $1 (this tenant) to DO UPDATE, and do not "
        f"assign {col}; or use ON CONFLICT DO NOTHING"
    )
    if action != "ONCONFLICT_UPDATE":
        raise Rejected("unproven_on_conflict", "this ON CONFLICT action is not supported", hint)
    for target_node in clause.get("targetList", []):
        if target_node.get("ResTarget", {}).get("name") == col:
            raise Rejected(
                "unproven_on_conflict", f"ON CONFLICT DO UPDATE must not assign {col}", hint
            )
    probe = Entry(entry.refname, resolved, entry.schema, entry.aliased)
    where = clause.get("whereClause")
    if where is not None:
        walker.prove(where, [probe], unqualified=None)
    if not probe.proven:
        raise Rejected(
            "unproven_on_conflict",
            f"ON CONFLICT DO UPDATE on {name} could update another tenant's row",
            hint,
        )


def _level(walker: Walker, node: Node, scope: Scope, from_key: str) -> Entry:
    entry = target(walker, node.get("relation", {}))
    entries = [entry]
    visible = [entry]
    for item in node.get(from_key, ()):
        visible.extend(walker.from_item(item, entries, scope))
    if walker.check:
        walker.prove_where(node.get("whereClause"), entries, visible)
    return entry


def update(walker: Walker, node: Node, scope: Scope) -> None:
    """Analyse an UpdateStmt."""
    if node.get("withClause"):
        scope = walker.with_clause(node["withClause"], scope)
    entry = _level(walker, node, scope, "fromClause")
    resolved = entry.resolved
    if walker.check and resolved is not None and resolved.kind == "scoped":
        col = resolved.tenant_column
        for item in node.get("targetList", []):
            res = item.get("ResTarget", {})
            if res.get("name") != col:
                continue
            value = None if res.get("indirection") else tenant_value(res.get("val", {}))
            if value is None:
                raise Rejected(
                    "tenant_column_update",
                    f"UPDATE may only set {col} to a constant or parameter",  # noqa: S608
                    f"drop {col} from SET, or set it to $1 (this tenant)",
                )
            walker.record(value)
    _walk_rest(walker, node, scope, ("relation", "withClause", "fromClause"))


def delete(walker: Walker, node: Node, scope: Scope) -> None:
    """Analyse a DeleteStmt."""
    if node.get("withClause"):
        scope = walker.with_clause(node["withClause"], scope)
    _level(walker, node, scope, "usingClause")
    _walk_rest(walker, node, scope, ("relation", "withClause", "usingClause"))
