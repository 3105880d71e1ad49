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

:meth:`TextShapes.lane_program` spells what the digit-key level tests as
checks of a text's bytes, which the session's C lane applies to the next
texts of a digit key (``_lane.c``'s ``shape_fits``).
"""

from __future__ import annotations

import json
import re
from array import array
from typing import Final

from .model import Analysis, StatementAnalysis
from .shapes import Shape, constants_of, with_tenant_constants

# A plain string literal, or a decimal integer (maybe with a minus), standing alone.
# The lookahead first lets the regex engine skip to candidate characters quickly; the
# group makes ``split`` return the literals between the other pieces (no match objects).
_LITERAL: Final = re.compile(
    r"(?=['\d-])(?<![\w$.'&])('[^']*(?:''[^']*)*'(?!')|-?\d+(?![\w$.]))", re.ASCII
)
_INT4_MAX: Final = 2**31 - 1
_INT4_MAX_DIGITS: Final = str(_INT4_MAX)
_INT4_DIGITS: Final = len(_INT4_MAX_DIGITS)
_A_CONST: Final = '{"A_Const":'
# Every digit to 0: texts that differ only in digits get one digit key.
_DIGITS_TO_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")

# The lane's checks (see TextShapes.lane_program and _lane.c's shape_query): each a
# triple of uint32 (check, start, end).
LANE_DIGIT: Final = 0  # the byte at ``start`` is the digit ``end``
LANE_INT4: Final = 1  # the integer literal [start, end) is one PostgreSQL makes an int4
LANE_NUMERIC: Final = 2  # ... one it makes a numeric
LANE_TENANT: Final = 3  # [start, end) is the tenant's string literal, byte for byte

# (the text with its literals masked, the text split around its literals: the pieces
# between them at even indexes, the literals at odd ones).
TextKey = tuple[str, list[str]]


def _kind(token: str) -> str:
    """s: string; i: an integer PostgreSQL makes an int4 constant, n: a numeric one;
    I and N: the same with a minus (an operator token the grammar folds into the constant).
    """
    if token[0] == "'":
        return "s"
    if token[0] == "-":
        return "I" if _fits_int4(token[1:]) else "N"
    return "i" if _fits_int4(token) else "n"


def _fits_int4(digits: str) -> bool:
    """Whether a run of decimal digits is at most 2**31 - 1 (compared as text: for digit
    strings of one length, text order is numeric order)."""
    if len(digits) < _INT4_DIGITS:
        return True
    digits = digits.lstrip("0")
    return len(digits) < _INT4_DIGITS or (
        len(digits) == _INT4_DIGITS and digits <= _INT4_MAX_DIGITS
    )


def _value(token: str, kind: str) -> str:
    """A literal's value as libpg_query's JSON spells it (for its kind)."""
    if kind == "s":
        return token[1:-1].replace("''", "'")
    return str(int(token)) if kind in "iI" else token


def digits_of(sql: bytes) -> bytes:
    """``sql``'s digit key: its bytes with every digit made ``0`` (see TextShapes)."""
    return sql.translate(_DIGITS_TO_ZERO)


def text_key(sql: str) -> TextKey | None:
    """(the text with its literals masked, its pieces), or None if not ASCII."""
    if not sql.isascii():
        return None  # libpg_query's locations count bytes; only ASCII keeps them in step
    pieces = _LITERAL.split(sql)
    masked = pieces.copy()
    for index in range(1, len(pieces), 2):
        token = pieces[index]
        masked[index] = f"\x00{_kind(token)}{len(token)}\x00"  # NUL never occurs in SQL text
    return "".join(masked), pieces


def literals_of(key: TextKey) -> list[str]:
    """The literals of ``key``'s text, in text order."""
    return key[1][1::2]


def _literal_starts(key: TextKey) -> list[int]:
    """Where each literal of ``key``'s text starts (a character offset, which is a byte
    offset: keys are made of ASCII texts only)."""
    starts: list[int] = []
    position = 0
    for index, piece in enumerate(key[1]):
        if index % 2:
            starts.append(position)
        position += len(piece)
    return starts


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
    literals = literals_of(key)
    constants = constants_of(json_text)
    if len(constants) != len(literals) or json_text.count(_A_CONST) != len(constants):
        return None
    index_at = {start: i for i, start in enumerate(_literal_starts(key))}
    slots: list[int] = []
    for constant in constants:
        index = index_at.pop(int(constant.group("location")), None)
        if index is None:
            return None
        token = literals[index]
        kind = _kind(token)
        if _constant_value(constant, token[0] == "-") != (kind, _value(token, kind)):
            return None
        slots.append(index)
    return slots


class _DigitKey:
    """The texts of one digit key: where their literals are, and which text keys they have.

    All texts of a digit key have their literals at the same places
    (``spans``; the literal scan cannot tell their digits apart).  They differ
    in the digits outside integer literals (``fixed_at``: in names, strings,
    ``$1``, which are part of the text key) and in the int4-or-numeric kind of
    integer literals of ten digits or more (``long``).  ``variants`` maps those
    digits and kinds to the text key and to where *its* tenant literals are: a
    digit in a name can change the table, so which literals are tenant values
    is a property of the text key, never of the digit key.
    """

    __slots__ = ("fixed_at", "long", "spans", "variants")

    def __init__(
        self,
        fixed_at: tuple[int, ...],
        long: tuple[tuple[int, int], ...],
        spans: tuple[tuple[int, int], ...],
    ) -> None:
        self.fixed_at = fixed_at
        self.long = long
        self.spans = spans
        self.variants: dict[tuple[bytes, str], tuple[str, tuple[tuple[int, int], ...]]] = {}

    def variant(self, sql: bytes) -> tuple[bytes, str]:
        """What tells apart the text keys of this digit key's texts, for ``sql``."""
        fixed = bytes([sql[at] for at in self.fixed_at])
        kinds = "".join([_kind(sql[start:end].decode("ascii")) for start, end in self.long])
        return fixed, kinds


class TextShapes:
    """Text key -> (statement template, where its tenant values are in the text).

    The analyses handed out are kept too, by key and tenant literals: a text
    shape's traffic repeats its tenants' values, and an analysis is immutable,
    so the next text of that key and those values gets the same object
    instead of a new one (building one costs more than the rest of a lookup).

    In front of the text keys, :meth:`lookup_bytes` finds the key of a text
    without the literal scan: a text that has been looked up (and whose only
    string literals are tenant values, which repeat) is filed under its *digit
    key*, its bytes with every digit made ``0``.  Another text of that digit key
    differs from it in digits only, digit for digit.  :data:`_LITERAL` never
    tells two digits apart (it asks only whether a character is a digit, a
    quote, a word character...), so it finds the same literals at the same
    places in both; if their digits outside integer literals are the same and
    each integer literal keeps its int4-or-numeric kind (:class:`_DigitKey`'s
    variants), both texts have one text key and :meth:`lookup` would answer the
    same.
    """

    __slots__ = ("_digit_variants", "_digits", "_entries", "_made", "hits", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        # masked text -> (template, indexes in the key's pieces of the tenant literals)
        self._entries: dict[str, tuple[StatementAnalysis, tuple[int, ...]]] = {}
        self._made: dict[tuple[str, tuple[str, ...]], Analysis] = {}
        self._digits: dict[bytes, _DigitKey] = {}
        self._digit_variants = 0  # in all of _digits (what bounds its size)
        self.hits = 0

    def lookup(self, key: TextKey) -> Analysis | None:
        """The analysis of the text ``key`` was made from, if its key is known."""
        masked, pieces = key
        entry = self._entries.get(masked)
        if entry is None:
            return None
        slots = entry[1]
        found = self._analysis(masked, tuple([pieces[slot] for slot in slots]))
        if found is not None and len(pieces) > 1:
            self._file_digits(key, slots)
        return found

    def lookup_bytes(self, sql: bytes) -> Analysis | None:
        """What :meth:`lookup` answers for the text ``sql`` (UTF-8), if its digit key
        tells its text key; None means only that this level cannot tell."""
        digit_key = self._digits.get(digits_of(sql))
        if digit_key is None:
            return None
        found = digit_key.variants.get(digit_key.variant(sql))
        if found is None:
            return None
        masked, spans = found
        return self._analysis(
            masked, tuple([sql[start:end].decode("ascii") for start, end in spans])
        )

    def lane_program(self, sql: bytes, digits: bytes, tenant_literal: bytes) -> bytes | None:
        """The checks by which the session's lane may tell, from a text's bytes alone,
        that a text of the digit key ``digits`` (``sql``'s) is of ``sql``'s text key
        with ``tenant_literal`` at each tenant literal, as :meth:`lookup_bytes`
        would find: its digits outside integer literals, the int4-or-numeric kind of
        each long integer literal, and the bytes of each tenant literal.  A text that
        passes them has :meth:`lookup_bytes`'s analysis of ``sql``.  None unless
        ``sql`` is filed under ``digits`` and each of its tenant literals is
        ``tenant_literal``.
        """
        digit_key = self._digits.get(digits)
        if digit_key is None:
            return None
        variant = digit_key.variant(sql)
        found = digit_key.variants.get(variant)
        if found is None:
            return None
        checks = array("I")
        for start, end in found[1]:
            if sql[start:end] != tenant_literal:
                return None
            checks.extend((LANE_TENANT, start, end))
        for at in digit_key.fixed_at:
            checks.extend((LANE_DIGIT, at, sql[at]))
        for (start, end), kind in zip(digit_key.long, variant[1], strict=True):
            checks.extend((LANE_INT4 if kind in "iI" else LANE_NUMERIC, start, end))
        return checks.tobytes()

    def _analysis(self, masked: str, tokens: tuple[str, ...]) -> Analysis | None:
        """The analysis of a text of key ``masked`` whose tenant literals are ``tokens``."""
        made_key = (masked, tokens)
        found = self._made.get(made_key)
        if found is None:
            entry = self._entries.get(masked)
            if entry is None:
                return None
            found = _with_literals(entry[0], tokens)
            if found is None:
                return None
            if len(self._made) >= self.maxsize:
                self._made.clear()
            self._made[made_key] = found
        self.hits += 1
        return found

    def _file_digits(self, key: TextKey, tenant_slots: tuple[int, ...]) -> None:
        """File the text of ``key`` under its digit key, unless it has string literals
        other than tenant values (names, say: its digit key would not come back)."""
        masked, pieces = key
        if any(pieces[i][0] == "'" for i in range(1, len(pieces), 2) if i not in tenant_slots):
            return
        text = "".join(pieces).encode("ascii")
        digit_key_bytes = text.translate(_DIGITS_TO_ZERO)
        digit_key = self._digits.get(digit_key_bytes)
        if digit_key is None:
            if self._digit_variants >= self.maxsize:
                self._digits.clear()
                self._digit_variants = 0
            digit_key = self._digits[digit_key_bytes] = _digit_key(pieces)
        self._digit_variants += 1
        tenant_spans = tuple(digit_key.spans[slot // 2] for slot in tenant_slots)
        digit_key.variants[digit_key.variant(text)] = (masked, tenant_spans)

    def learn(self, key: TextKey, json_text: str, shape: Shape) -> bool:
        """Record ``key`` from a text of a known tree shape, if they pair up; says if it did."""
        slots = literal_slots(key, json_text)
        if slots is None:
            return False
        entries = self._entries
        if key[0] in entries:
            # What was made from its old template goes with it.
            self._made.clear()
            self._digits.clear()
            self._digit_variants = 0
        elif len(entries) >= self.maxsize:
            self.clear()
        tenant_pieces = tuple(2 * slots[s] + 1 for s in shape.tenant_slots)
        entries[key[0]] = (shape.statement, tenant_pieces)
        return True

    def __contains__(self, key: TextKey) -> bool:
        return key[0] in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()
        self._made.clear()
        self._digits.clear()
        self._digit_variants = 0


def _with_literals(template: StatementAnalysis, tokens: tuple[str, ...]) -> Analysis | None:
    """``template``'s analysis for a text whose tenant literals are ``tokens``."""
    constants = set()
    for token in tokens:
        kind = _kind(token)
        if kind in "nN":
            return None  # not a tenant id as the analyser reads one
        constants.add(_value(token, kind))
    return with_tenant_constants(template, frozenset(constants))


def _digit_key(pieces: list[str]) -> _DigitKey:
    """The digit key's structure, from one of its texts split into ``pieces``."""
    fixed_at: list[int] = []
    long: list[tuple[int, int]] = []
    spans: list[tuple[int, int]] = []
    position = 0
    for index, piece in enumerate(pieces):
        end = position + len(piece)
        if index % 2 == 0 or piece[0] == "'":
            fixed_at.extend(position + i for i, char in enumerate(piece) if "0" <= char <= "9")
        elif len(piece) - (piece[0] == "-") >= _INT4_DIGITS:
            long.append((position, end))
        if index % 2:
            spans.append((position, end))
        position = end
    return _DigitKey(tuple(fixed_at), tuple(long), tuple(spans))
