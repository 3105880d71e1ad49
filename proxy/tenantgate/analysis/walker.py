"""Query-level walk over the pglast JSON tree: range entries, scoping, proofs.

Owns the notion of a *query level* (one SELECT core, or one INSERT/UPDATE/
DELETE) and its *range entries* (FROM items, UPDATE/DELETE targets).  Every
node of a statement is visited exactly once by :meth:`Walker.walk`, which
dispatches on node type: a ``SelectStmt`` anywhere (FROM subquery, SubLink,
CTE, set-operation arm, INSERT source) opens a new level; ``FuncCall`` is
checked against the function rules; ``ParamRef`` is counted; a ``RangeVar`` or
statement node in an unexpected position is refused (fail closed).

Proof rule (see :mod:`.predicates` for the conjunct shape): every entry of a
scoped table needs a proof conjunct in the WHERE of its own level, or in the
ON of a join whose subtree contains it and where it is not on the preserved
side (INNER: both sides; LEFT: right side; RIGHT: left side; FULL: neither).
Entries inside an *aliased* join ``(a JOIN b) AS j`` are hidden from the
outside (as in Postgres) and can only be proven inside that join.
CTE names are scoped like Postgres: a non-recursive WITH item sees only the
items before it, a recursive WITH sees all of them; only unqualified names
resolve to CTEs, and DML targets never do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from . import writes
from .entries import Entry, check_readable, missing_predicate, unsupported
from .functions import FunctionRules
from .model import AnalysisPolicy, Rejected
from .predicates import TenantValue, conjuncts, equality_sides
from .relations import Resolver, display

Node = dict[str, Any]
Scope = frozenset[str]


class Walker:
    """Walks one statement; collects tenant constants/params; raises Rejected."""

    __slots__ = (
        "check",
        "constants",
        "functions",
        "max_param",
        "params",
        "policy",
        "resolver",
        "writes",
    )

    def __init__(
        self, policy: AnalysisPolicy, resolver: Resolver, functions: FunctionRules
    ) -> None:
        self.policy = policy
        self.check = policy.check_predicates
        self.resolver = resolver
        self.functions = functions
        self.constants: set[str] = set()
        self.params: set[int] = set()
        self.max_param = 0
        self.writes = False

    # ----------------------------------------------------------- generic walk
    def walk(self, node: Any, scope: Scope) -> None:
        """Visit every node below ``node``, dispatching the special node types.

        Hot path: scalar values are skipped by a type check, leaf node types
        (constants, column references, names) by :data:`_SKIP`.
        """
        if type(node) is list:
            for item in node:
                kind = type(item)
                if kind is dict or kind is list:
                    self.walk(item, scope)
            return
        if type(node) is not dict:
            return
        for key, value in node.items():
            kind = type(value)
            if kind is not dict and kind is not list:
                continue
            handler = _SPECIAL.get(key)
            if handler is not None:
                if handler is not _skip:
                    handler(self, value, scope)
            elif key.endswith("Stmt") and key[:1].isupper():
                raise unsupported(key)
            else:
                self.walk(value, scope)

    def _param(self, node: Node, scope: Scope) -> None:
        number = node.get("number", 0)
        if isinstance(number, int) and number > self.max_param:
            self.max_param = number

    def _func(self, node: Node, scope: Scope) -> None:
        names = node.get("funcname", [])
        last = names[-1].get("String", {}).get("sval", "") if names else ""
        if self.functions.is_denied(str(last)):
            raise Rejected(
                "denied_function",
                f"calling {str(last).lower()}() is not allowed",
                "this function can reach data, settings or sessions outside "
                "the tenant; remove it or ask the operator to allow it",
            )
        for key, value in node.items():
            if key != "funcname" and isinstance(value, (dict, list)):
                self.walk(value, scope)

    def _range_var_here(self, node: Node, scope: Scope) -> None:
        raise unsupported("table reference in this position")

    def _into(self, node: Node, scope: Scope) -> None:
        raise Rejected(
            "statement_class",
            "SELECT INTO (creates a table) is not allowed",
            "use a plain SELECT; tenants cannot create tables",
        )

    def _merge(self, node: Node, scope: Scope) -> None:
        raise Rejected(
            "statement_class",
            "MERGE is not allowed",
            "use INSERT ... ON CONFLICT or separate UPDATE/INSERT statements",
        )

    # ------------------------------------------------------------- SELECT
    def select(self, stmt: Node, scope: Scope) -> None:
        """Analyse one SelectStmt body (a new query level, or a set operation)."""
        with_clause = stmt.get("withClause")
        if with_clause:
            scope = self.with_clause(with_clause, scope)
        if stmt.get("op", "SETOP_NONE") != "SETOP_NONE":
            for key, value in stmt.items():
                if key in ("larg", "rarg"):  # bare SelectStmt bodies in the JSON
                    self.select(value.get("SelectStmt", value), scope)
                elif key != "withClause" and isinstance(value, (dict, list)):
                    self.walk(value, scope)
            return
        if "intoClause" in stmt:
            self._into(stmt["intoClause"], scope)
        entries: list[Entry] = []
        visible: list[Entry] = []
        for item in stmt.get("fromClause", ()):
            visible.extend(self.from_item(item, entries, scope))
        if self.check:
            self.prove_where(stmt.get("whereClause"), entries, visible)
        for key, value in stmt.items():
            if key in ("fromClause", "withClause", "lockingClause"):
                continue
            if isinstance(value, (dict, list)):
                self.walk(value, scope)

    def with_clause(self, with_clause: Node, scope: Scope) -> Scope:
        """Analyse the CTE bodies; returns the scope the main query sees."""
        ctes = [c.get("CommonTableExpr", {}) for c in with_clause.get("ctes", [])]
        names = frozenset(str(c.get("ctename", "")) for c in ctes)
        if with_clause.get("recursive"):
            inner = scope | names
            for cte in ctes:
                self.walk(cte.get("ctequery"), inner)
        else:
            current = scope
            for cte in ctes:
                self.walk(cte.get("ctequery"), current)
                current = current | {str(cte.get("ctename", ""))}
        for cte in ctes:
            for key, value in cte.items():
                if key != "ctequery" and isinstance(value, (dict, list)):
                    self.walk(value, scope | names)
        return scope | names

    # ------------------------------------------------------------ FROM items
    def from_item(self, item: Node, entries: list[Entry], scope: Scope) -> list[Entry]:
        """Collect the entries of one FROM item; returns those visible above it."""
        if "RangeVar" in item:
            entry = self.range_var(item["RangeVar"], scope)
            entries.append(entry)
            return [entry]
        if "JoinExpr" in item:
            return self._join(item["JoinExpr"], entries, scope)
        if "RangeTableSample" in item:
            sample = item["RangeTableSample"]
            entry = self.range_var(sample.get("relation", {}).get("RangeVar", {}), scope)
            entries.append(entry)
            for key in ("args", "repeatable"):
                self.walk(sample.get(key), scope)
            return [entry]
        for kind in ("RangeSubselect", "RangeFunction", "RangeTableFunc", "JsonTable"):
            body = item.get(kind)
            if body is not None:
                self.walk(body, scope)
                alias = body.get("alias") or {}
                entry = Entry(alias.get("aliasname"), None)
                entries.append(entry)
                return [entry]
        raise unsupported(next(iter(item), "FROM item"))

    def _join(self, join: Node, entries: list[Entry], scope: Scope) -> list[Entry]:
        left = self.from_item(join.get("larg", {}), entries, scope)
        right = self.from_item(join.get("rarg", {}), entries, scope)
        quals = join.get("quals")
        if quals is not None:
            self.walk(quals, scope)
            if self.check:
                kind = join.get("jointype", "")
                constrained = {
                    "JOIN_INNER": left + right,
                    "JOIN_LEFT": right,
                    "JOIN_RIGHT": left,
                }.get(kind, [])
                if constrained:
                    self.prove(quals, constrained, unqualified=None)
        alias = join.get("alias")
        if not alias:
            return left + right
        for entry in left + right:
            entry.hidden = True
        entry = Entry(alias.get("aliasname"), None)
        entries.append(entry)
        return [entry]

    def range_var(self, rv: Node, scope: Scope) -> Entry:
        """Resolve a FROM-clause RangeVar into an entry (rejecting what is refused)."""
        schema = rv.get("schemaname")
        name = str(rv.get("relname", ""))
        alias = rv.get("alias") or {}
        refname = alias.get("aliasname") or name
        if schema is None and name in scope:
            return Entry(refname, None)
        resolved = self.resolver.resolve(schema, name)
        check_readable(resolved, self.resolver)
        if resolved.kind == "scoped" and self.check and alias.get("colnames"):
            raise Rejected(
                "alias_column_list",
                f"column alias lists on tenant table {display(resolved)} are not allowed",
                f"write {refname} without a column list and alias columns "
                "in the SELECT list instead",
            )
        return Entry(refname, resolved, schema, bool(alias))

    # ----------------------------------------------------------------- proof
    def prove_where(self, where: Node | None, entries: list[Entry], visible: list[Entry]) -> None:
        """Apply WHERE conjuncts to this level's entries and require every proof."""
        only = entries[0] if len(entries) == 1 else None
        if where is not None:
            self.prove(where, [e for e in visible if not e.hidden], unqualified=only)
        for entry in entries:
            if entry.scoped and not entry.proven:
                raise missing_predicate(entry)

    def prove(self, expr: Node, candidates: list[Entry], unqualified: Entry | None) -> None:
        """Mark candidates proven by the conjuncts of ``expr``; record values."""
        for conjunct in conjuncts(expr):
            for fields, value in equality_sides(conjunct):
                entry = _match(fields, candidates, unqualified)
                if entry is not None:
                    entry.proven = True
                    self.record(value)

    def record(self, value: TenantValue) -> None:
        """Remember a value that must equal the tenant."""
        if value[0] == "param":
            self.params.add(int(value[1]))
        else:
            self.constants.add(str(value[1]))

    # ------------------------------------------------------------------- DML
    def _insert(self, node: Node, scope: Scope) -> None:
        self.writes = True
        writes.insert(self, node, scope)

    def _update(self, node: Node, scope: Scope) -> None:
        self.writes = True
        writes.update(self, node, scope)

    def _delete(self, node: Node, scope: Scope) -> None:
        self.writes = True
        writes.delete(self, node, scope)

    def _select_node(self, node: Node, scope: Scope) -> None:
        self.select(node, scope)


def _match(fields: list[str], candidates: list[Entry], unqualified: Entry | None) -> Entry | None:
    """The scoped entry a proof column reference names (unique), or None."""
    if len(fields) == 1:
        if (
            unqualified is not None
            and unqualified.scoped
            and unqualified.resolved is not None
            and fields[0] == unqualified.resolved.tenant_column
        ):
            return unqualified
        return None
    if len(fields) == 2:
        hits = [e for e in candidates if e.refname == fields[0]]
    elif len(fields) == 3:
        hits = [
            e
            for e in candidates
            if not e.aliased and e.schema == fields[0] and e.refname == fields[1]
        ]
    else:
        return None
    if len(hits) != 1:
        return None
    entry = hits[0]
    if entry.scoped and entry.resolved is not None and fields[-1] == entry.resolved.tenant_column:
        return entry
    return None


_SPECIAL: dict[str, Callable[[Walker, Any, Scope], None]] = {
    "SelectStmt": Walker._select_node,
    "InsertStmt": Walker._insert,
    "UpdateStmt": Walker._update,
    "DeleteStmt": Walker._delete,
    "MergeStmt": Walker._merge,
    "FuncCall": Walker._func,
    "ParamRef": Walker._param,
    "RangeVar": Walker._range_var_here,
    "IntoClause": Walker._into,
}


def _skip(_walker: Walker, _node: Any, _scope: Scope) -> None:
    """Leaf node types: nothing below them can matter."""


for _leaf in (
    "A_Const",
    "String",
    "A_Star",
    "ColumnRef",
    "Integer",
    "Float",
    "Boolean",
    "BitString",
    "names",
    "SQLValueFunction",
    "alias",
    "Alias",
):
    _SPECIAL[_leaf] = _skip
