"""Parsing: query text -> top-level statement nodes with byte locations.

Owns the call into libpg_query (``pglast.parser.parse_sql_json`` + ``json.loads``,
about ten times faster than building pglast AST objects) and the refusal of text
that cannot be parsed.  ``stmt_location``/``stmt_len`` from libpg_query are
**byte offsets into the UTF-8 encoding** of the text (verified: ``"select 'é' ;
select 1"`` gives the second statement ``stmt_location`` 14, not 13); an absent
``stmt_len`` means "to the end".

Text containing NUL is refused: libpg_query (like the server) reads a C string
and would silently ignore everything after the NUL.  The parser's own error
message is never echoed (it quotes the text near the error, which may hold a
literal); only the byte position is reported.
"""

from __future__ import annotations

import json
from typing import Any

from pglast.parser import ParseError, parse_sql_json

from .model import Rejected

Node = dict[str, Any]
RawStatement = tuple[Node, int, int]


def parse(sql: str) -> list[RawStatement]:
    """Parse ``sql`` into (statement node, byte location, byte length) triples."""
    return statements(parse_json(sql))


def parse_json(sql: str) -> str:
    """libpg_query's JSON parse tree of ``sql``; :class:`Rejected` if it does not parse."""
    if "\x00" in sql:
        raise Rejected(
            "parse_error",
            "the statement contains a NUL character",
            "remove the NUL byte from the query text",
        )
    try:
        return parse_sql_json(sql)
    except ParseError as exc:
        position = _position(exc)
        where = f" near position {position}" if position is not None else ""
        raise Rejected(
            "parse_error",
            f"the statement could not be parsed{where}",
            "check the SQL syntax (tenantgate uses the PostgreSQL parser)",
        ) from None
    except Exception:  # anything else (encoding, recursion) fails closed
        raise Rejected(
            "parse_error",
            "the statement could not be parsed",
            "check the SQL syntax (tenantgate uses the PostgreSQL parser)",
        ) from None


def statements(text: str) -> list[RawStatement]:
    """The (statement node, byte location, byte length) triples of a JSON parse tree."""
    tree = json.loads(text)
    out: list[RawStatement] = []
    for raw in tree.get("stmts", ()):
        out.append(
            (raw.get("stmt", {}), int(raw.get("stmt_location", 0)), int(raw.get("stmt_len", 0)))
        )
    return out


def _position(exc: ParseError) -> int | None:
    location = getattr(exc, "location", None)
    if isinstance(location, int):
        return location
    args = exc.args
    if len(args) > 1 and isinstance(args[1], int):
        return args[1]
    return None
