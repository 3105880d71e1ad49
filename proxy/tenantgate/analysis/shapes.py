"""Analyses shared by statements that differ only in their constants.

Owns :class:`ShapeCache`: the second level of the analysis cache, for texts
the text cache has not seen, such as ``WHERE tenant_id = 'acme' AND id = 4711``
with a new id in every statement (the simple protocol inlines parameters).

The *shape* of a statement is libpg_query's JSON parse tree with every
constant's value and every location removed (a constant keeps its kind:
string, integer, NULL...).  Two texts of the same shape have the same parse
tree but for constant values, so the analyser's verdict differs only where a
constant's value matters.  Which constants those are is learnt once per
shape by analysing a *probe*: the same tree with each constant replaced by a
``$n`` parameter.  A shape is recorded only when

* the text is one SELECT, INSERT, UPDATE or DELETE with no timeout setting,
* both the text's own analysis and the probe's allow it, and
* the constants the probe marks as tenant values are exactly the text's own
  tenant constants (so a cast that normalises a value, say ``'042'::int``,
  never gets a shape);

a later text of that shape then gets the recorded analysis with its own
values at those positions as tenant constants, which :func:`check_tenant`
compares with the session's tenant as for any other analysis.  Everything
else (no shape yet, any doubt) takes the full analysis.  The constants are
found by one regular expression over the JSON text, used for the shape, the
probe and the values alike, so positions always line up; a constant it does
not recognise simply stays part of the shape.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Final

from .model import Analysis, StatementAnalysis

# One A_Const object of libpg_query's JSON: kind, optional value, location.
_CONSTANT: Final = re.compile(
    r'\{"A_Const":\{(?:"(?P<kind>sval|ival|fval|bsval|boolval)":\{'
    r'(?:"(?P=kind)":(?P<value>"(?:[^"\\]|\\.)*"|-?\d+|true|false))?\},'
    r'|(?P<null>"isnull":true,))"location":(?P<location>-?\d+)\}\}'
)
_CONSTANT_START: Final = '{"A_Const":'
_SHAPED_TAGS: Final = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
_UNSHAPED: Final = object()  # a shape known not to qualify: skip the probe next time


@dataclass(frozen=True, slots=True)
class Shape:
    """What every text of one shape shares; ``tenant_slots`` index its constants."""

    statement: StatementAnalysis
    tenant_slots: tuple[int, ...]


def constants_of(json_text: str) -> list[re.Match[str]]:
    """Every constant of a JSON parse tree, in text order.

    ``str.find`` plus an anchored match: several times cheaper than letting the
    regular expression scan the whole text.  The shape, the probe and the
    values all come from this one list, so their positions always agree.
    """
    found: list[re.Match[str]] = []
    find, match = json_text.find, _CONSTANT.match
    pos = find(_CONSTANT_START)
    while pos >= 0:
        constant = match(json_text, pos)
        if constant is not None:
            found.append(constant)
            pos = constant.end()
        else:
            pos += 1
        pos = find(_CONSTANT_START, pos)
    return found


def shape_key(json_text: str, constants: list[re.Match[str]] | None = None) -> str:
    """The shape of a parse tree's JSON text: constant values removed, all else kept.

    Locations stay, so texts whose constants are written with other lengths
    have other shapes (a few per statement), and every location, the
    statement's length included, is the same for all texts of a shape.

    ``constants``: the text's :func:`constants_of`, if the caller already has them.
    """
    if constants is None:
        constants = constants_of(json_text)
    masks = ['{"A_Const":' + (constant.group("kind") or "null") + "}" for constant in constants]
    return _replaced(json_text, constants, masks)


def probe_text(json_text: str, first_number: int) -> tuple[str, int]:
    """The JSON with each constant replaced by ``$first_number``, ``$first_number+1``...

    Returns the probe's JSON text and how many constants it replaced.
    """
    constants = constants_of(json_text)
    parameters = [
        '{"ParamRef":{"number":' + str(number) + ',"location":0}}'
        for number in range(first_number, first_number + len(constants))
    ]
    return _replaced(json_text, constants, parameters), len(constants)


def _replaced(json_text: str, constants: list[re.Match[str]], replacements: list[str]) -> str:
    """``json_text`` with each of ``constants`` replaced by the matching replacement."""
    pieces: list[str] = []
    end = 0
    for constant, replacement in zip(constants, replacements, strict=True):
        pieces.append(json_text[end : constant.start()])
        pieces.append(replacement)
        end = constant.end()
    pieces.append(json_text[end:])
    return "".join(pieces)


def tenant_value(match: re.Match[str]) -> str | None:
    """A constant's value as a tenant id (as the analyser reads it), or None."""
    kind, value = match.group("kind"), match.group("value")
    if kind == "sval" and value is not None:
        decoded = json.loads(value)
        return decoded if isinstance(decoded, str) else None
    if kind == "ival":
        return str(int(value)) if value is not None else "0"  # libpg_query omits 0
    return None


class ShapeCache:
    """Shape -> :class:`Shape` (or "does not qualify"), bounded by entry count."""

    __slots__ = ("_entries", "hits", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: dict[str, Shape | object] = {}
        self.hits = 0

    def lookup(self, json_text: str) -> tuple[str, Analysis | None]:
        """(shape key, the analysis of this text if its shape is known), else None."""
        matches = constants_of(json_text)
        key = shape_key(json_text, matches)
        shape = self._entries.get(key)
        if not isinstance(shape, Shape):
            return key, None
        constants = set()
        for slot in shape.tenant_slots:
            value = tenant_value(matches[slot])
            if value is None:
                return key, None
            constants.add(value)
        self.hits += 1
        return key, with_tenant_constants(shape.statement, frozenset(constants))

    def shape(self, key: str) -> Shape | None:
        """The shape recorded under ``key``, if it qualified."""
        shape = self._entries.get(key)
        return shape if isinstance(shape, Shape) else None

    def learn(self, key: str, json_text: str, analysis: Analysis, probe: Analysis | None) -> None:
        """Record ``key``'s shape from a text's own analysis and its probe's (see module doc)."""
        shape = _shape_of(json_text, analysis, probe)
        if len(self._entries) >= self.maxsize:
            self._entries.clear()
        self._entries[key] = shape if shape is not None else _UNSHAPED

    def wants_probe(self, key: str) -> bool:
        """Whether ``key`` is new (a probe analysis would be worth making)."""
        return key not in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()


def with_tenant_constants(template: StatementAnalysis, constants: frozenset[str]) -> Analysis:
    """The analysis of a text of ``template``'s shape whose tenant values are ``constants``."""
    return Analysis(
        (
            StatementAnalysis(
                command=template.command,
                tag=template.tag,
                transaction=template.transaction,
                location=template.location,
                length=template.length,
                tenant_constants=constants,
                tenant_params=template.tenant_params,
                statement_timeout_ms=None,
                param_count=template.param_count,
                idle_in_transaction_timeout_ms=None,
            ),
        ),
        None,
    )


def qualifies(analysis: Analysis) -> bool:
    """Whether a text's own analysis can stand for its shape (see module doc)."""
    if analysis.rejection is not None or len(analysis.statements) != 1:
        return False
    statement = analysis.statements[0]
    return (
        statement.tag in _SHAPED_TAGS
        and statement.transaction is None
        and statement.statement_timeout_ms is None
        and statement.idle_in_transaction_timeout_ms is None
        and statement.location == 0
    )


def _shape_of(json_text: str, analysis: Analysis, probe: Analysis | None) -> Shape | None:
    if probe is None or probe.rejection is not None or not qualifies(analysis):
        return None
    if len(probe.statements) != 1:
        return None
    statement = analysis.statements[0]
    base = statement.param_count
    matches = constants_of(json_text)
    slots = tuple(sorted(n - base - 1 for n in probe.statements[0].tenant_params if n > base))
    if any(slot >= len(matches) for slot in slots):
        return None
    values = {tenant_value(matches[slot]) for slot in slots}
    if None in values or values != statement.tenant_constants:
        return None  # the probe and the text disagree on the tenant values: no shortcut
    if probe.statements[0].tenant_params - set(range(base + 1, base + 1 + len(matches))) != (
        statement.tenant_params
    ):
        return None  # the text's own $n parameters must be read the same way
    return Shape(statement, slots)
