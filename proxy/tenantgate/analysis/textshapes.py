"""Shapes recognised in the SQL text itself, before any parse.

Owns :class:`TextShapes`: the level of the analysis cache in front of
:mod:`~tenantgate.analysis.shapes`.  W4-like traffic (the simple protocol with
a new id inlined in every statement) misses the text cache every time, and the
parse tree shape costs a libpg_query parse plus a walk of its JSON.  Here the
text's *literals* are masked instead: plain ``'...'`` strings and decimal
integers (with a minus glued on, which the grammar folds into the constant
where it is a sign), each replaced by a marker carrying its kind and length, so
``... tenant_id = 'acme' AND aid = 42`` and ``... tenant_id = 'gbex' AND aid =
17`` have one text key.

Why two texts of one key parse alike.  PostgreSQL's lexer reads left to right;
two texts of one key have the same bytes outside the literals, and each
literal, by construction of :data:`_LITERAL`, is a complete token (or a minus
and one) of the same kind however its content varies (a string has no lone
quote inside and none next to it; an integer has no identifier character, dot
or dollar next to it; only ASCII texts qualify).  So they lex to the same tokens but for literal
values, provided the lexer starts each literal in the same state, which
is what learning checks: a key is recorded only from a text whose parse tree
has exactly one constant at the start of each masked literal, with the
literal's own value, and no other constant (a literal inside a comment, a
dollar quote, ``U&'...'``, a binary minus as in ``a -1``, ``float(10)`` all
fail that check), and
only for a text whose tree shape is already known (``shapes.Shape``: one
plain SELECT/INSERT/UPDATE/DELETE whose tenant constants the probe agreed
on).  The integer marker says whether the value fits an int4, because that
decides between PostgreSQL's integer and numeric constants.  A hit returns the
shape's analysis with this text's values at the tenant slots, which
``check_tenant`` then compares with the session's tenant as for any analysis.
"""

from __future__ import annotations

import json
import re

from .model import Analysis, StatementAnalysis
from .shapes import Shape, constants_of, with_tenant_constants

# A plain string literal, or a decimal integer (maybe with a minus), standing alone.
# The lookahead first lets the regex engine skip to candidate characters quickly.
_LITERAL = re.compile(
    r"(?=['\d-])(?<![\w$.'&])(?:'[^']*(?:''[^']*)*'(?!')|-?\d+(?![\w$.]))", re.ASCII
)
_INT4_MAX = 2**31 - 1
_A_CONST = '{"A_Const":'

TextKey = tuple[str, list[re.Match[str]]]


def _kind(token: str) -> str:
    """s: string; i: an integer PostgreSQL makes an int4 constant, n: a numeric one;
    I and N: the same with a minus (an operator token the grammar folds into the constant).
    """
    if token[0] == "'":
        return "s"
    if token[0] == "-":
        return "I" if int(token[1:]) <= _INT4_MAX else "N"
    return "i" if int(token) <= _INT4_MAX else "n"


def _value(token: str, kind: str) -> str:
    """A literal's value as libpg_query's JSON spells it (for its kind)."""
    if kind == "s":
        return token[1:-1].replace("''", "'")
    return str(int(token)) if kind in "iI" else token


def text_key(sql: str) -> TextKey | None:
    """(the text with its literals masked, the literals), or None if not ASCII."""
    if not sql.isascii():
        return None  # libpg_query's locations count bytes; only ASCII keeps them in step
    found = list(_LITERAL.finditer(sql))
    pieces: list[str] = []
    end = 0
    for literal in found:
        token = literal.group()
        pieces.append(sql[end : literal.start()])
        pieces.append(f"\x00{_kind(token)}{len(token)}\x00")  # NUL never occurs in SQL text
        end = literal.end()
    pieces.append(sql[end:])
    return "".join(pieces), found


def _constant_value(constant: re.Match[str], negative: bool) -> tuple[str, str] | None:
    """(kind, value) of one of :func:`constants_of`'s constants, if a literal could be it.

    ``negative``: whether the literal at its location has a minus; the tree
    only says so by the value, which for ``-0`` it cannot.
    """
    kind, value = constant.group("kind"), constant.group("value")
    if kind == "ival":
        number = int(value) if value is not None else 0  # libpg_query omits 0
        return "I" if negative else "i", str(number)
    if kind in ("sval", "fval") and value is not None:
        decoded = json.loads(value)
        if not isinstance(decoded, str):
            return None
        return ("s" if kind == "sval" else "N" if negative else "n"), decoded
    return None


def literal_slots(key: TextKey, json_text: str) -> list[int] | None:
    """For each of the tree's constants (in :func:`constants_of` order), its literal's index.

    None unless the tree's constants and the text's literals pair up one to one,
    each constant located at its literal's first character with the literal's
    kind and value (see the module docstring for why this is the whole check).
    """
    literals = key[1]
    constants = constants_of(json_text)
    if len(constants) != len(literals) or json_text.count(_A_CONST) != len(constants):
        return None
    index_at = {literal.start(): i for i, literal in enumerate(literals)}
    slots: list[int] = []
    for constant in constants:
        index = index_at.pop(int(constant.group("location")), None)
        if index is None:
            return None
        token = literals[index].group()
        kind = _kind(token)
        if _constant_value(constant, token[0] == "-") != (kind, _value(token, kind)):
            return None
        slots.append(index)
    return slots


class TextShapes:
    """Text key -> (statement template, literal indexes of its tenant values)."""

    __slots__ = ("_entries", "hits", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._entries: dict[str, tuple[StatementAnalysis, tuple[int, ...]]] = {}
        self.hits = 0

    def lookup(self, key: TextKey) -> Analysis | None:
        """The analysis of the text ``key`` was made from, if its key is known."""
        entry = self._entries.get(key[0])
        if entry is None:
            return None
        template, slots = entry
        literals = key[1]
        constants = set()
        for slot in slots:
            token = literals[slot].group()
            kind = _kind(token)
            if kind in "nN":
                return None  # not a tenant id as the analyser reads one
            constants.add(_value(token, kind))
        self.hits += 1
        return with_tenant_constants(template, frozenset(constants))

    def learn(self, key: TextKey, json_text: str, shape: Shape) -> bool:
        """Record ``key`` from a text of a known tree shape, if they pair up; says if it did."""
        slots = literal_slots(key, json_text)
        if slots is None:
            return False
        if len(self._entries) >= self.maxsize:
            self._entries.clear()
        self._entries[key[0]] = (shape.statement, tuple(slots[s] for s in shape.tenant_slots))
        return True

    def __contains__(self, key: TextKey) -> bool:
        return key[0] in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
