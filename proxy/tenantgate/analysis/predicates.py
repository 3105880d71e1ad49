"""Tenant predicate proof: recognising ``<entry>.<tenant col> = <tenant value>``.

Owns what counts as a *tenant value* and as a *proof conjunct*.

A tenant value is, exactly:

* a string or integer constant (``A_Const`` sval/ival -- the parser has already
  decoded ``E''``, ``U&''``, dollar quoting; integers are rendered as decimal);
* a ``$n`` parameter (its Bind value is checked by the proxy);
* either of those wrapped in **one** cast to ``text``, ``varchar``, ``uuid``,
  ``int2``, ``int4`` or ``int8`` (unqualified or ``pg_catalog``), with no type
  modifier and no array bounds.  Typmods are refused because ``varchar(6)`` or
  ``char`` *truncate* ('globex2'::varchar(6) = 'globex').  A cast constant is
  recorded in the form the server compares: ``uuid`` canonical lowercase,
  integers in canonical decimal; an unreadable one is not a proof.

A proof conjunct is a top-level AND conjunct ``A = B`` (operator ``=`` or
``OPERATOR(pg_catalog.=)``), either way round, where one side is a bare column
reference (no cast, COLLATE, function, subscript) to the tenant column of the
entry and the other side is a tenant value.  The column may be written
``ref.col``, ``schema.table.col`` (only for an unaliased entry with that written
schema) or bare ``col`` -- the last only when the entry is the *only* range
entry of its query level, since otherwise another entry could own a column of
that name (or Postgres would call it ambiguous).  OR, IN, ANY, IS NULL,
BETWEEN, IS NOT DISTINCT FROM, row comparisons: never a proof.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

Node = dict[str, Any]

#: value kinds: ("const", decoded text) or ("param", number)
TenantValue = tuple[str, str] | tuple[str, int]

_CAST_TYPES = frozenset({"text", "varchar", "uuid", "int2", "int4", "int8"})


def conjuncts(expr: Node | None) -> Iterator[Node]:
    """The top-level AND conjuncts of an expression (flattened)."""
    if not expr:
        return
    stack = [expr]
    while stack:
        node = stack.pop()
        boolexpr = node.get("BoolExpr")
        if boolexpr is not None and boolexpr.get("boolop") == "AND_EXPR":
            stack.extend(reversed(boolexpr.get("args", [])))
        else:
            yield node


def tenant_value(node: Node) -> TenantValue | None:
    """The tenant value an expression denotes, or None if it is not one."""
    cast = node.get("TypeCast")
    if cast is not None:
        type_name = cast.get("typeName", {})
        if type_name.get("typmods") or type_name.get("arrayBounds") or type_name.get("setof"):
            return None
        names = [n.get("String", {}).get("sval") for n in type_name.get("names", [])]
        if len(names) == 2 and names[0] == "pg_catalog":
            names = names[1:]
        if len(names) != 1 or names[0] not in _CAST_TYPES:
            return None
        inner = _bare_value(cast.get("arg", {}))
        if inner is None:
            return None
        if inner[0] == "param":
            return inner
        return _coerce(str(inner[1]), names[0])
    return _bare_value(node)


def _bare_value(node: Node) -> TenantValue | None:
    param = node.get("ParamRef")
    if param is not None:
        number = param.get("number", 0)
        return ("param", number) if isinstance(number, int) and number > 0 else None
    const = node.get("A_Const")
    if const is None:
        return None
    if "sval" in const:
        return ("const", str(const["sval"].get("sval", "")))
    if "ival" in const:
        return ("const", str(int(const["ival"].get("ival", 0))))
    return None


def _coerce(text: str, type_name: str) -> TenantValue | None:
    if type_name in ("text", "varchar"):
        return ("const", text)
    if type_name == "uuid":
        try:
            return ("const", str(uuid.UUID(text.strip())))
        except ValueError:
            return None
    stripped = text.strip()
    body = stripped[1:] if stripped[:1] in "+-" else stripped
    if not body.isdigit() or not body.isascii():
        return None
    return ("const", str(int(stripped)))


def is_equality(expr: Node) -> bool:
    """True for ``A_Expr`` with operator ``=`` or ``OPERATOR(pg_catalog.=)``."""
    if expr.get("kind") != "AEXPR_OP":
        return False
    name = [n.get("String", {}).get("sval") for n in expr.get("name", [])]
    return name in (["="], ["pg_catalog", "="])


def column_fields(node: Node) -> list[str] | None:
    """The name parts of a bare column reference, or None."""
    ref = node.get("ColumnRef")
    if ref is None:
        return None
    out: list[str] = []
    for field in ref.get("fields", []):
        string = field.get("String")
        if string is None:
            return None
        out.append(str(string.get("sval", "")))
    return out


def equality_sides(conjunct: Node) -> Iterator[tuple[list[str], TenantValue]]:
    """For a proof-shaped conjunct, yield (column name parts, tenant value)."""
    expr = conjunct.get("A_Expr")
    if expr is None or not is_equality(expr):
        return
    left, right = expr.get("lexpr", {}), expr.get("rexpr", {})
    for col_side, value_side in ((left, right), (right, left)):
        fields = column_fields(col_side)
        if fields is None:
            continue
        value = tenant_value(value_side)
        if value is not None:
            yield fields, value
