"""PII-free statement text for the audit log: :func:`normalize` and :func:`fingerprint`.

Owns literal removal.  ``pglast.parser.normalize`` (libpg_query) is *not* used:
it keeps comments, DDL defaults, ``PREPARE`` bodies and COPY options verbatim
(verified), so it can leak literals.  Instead the text is re-tokenised with the
PostgreSQL scanner (``pglast.parser.scan``): every literal token (string,
escape, Unicode, dollar-quoted, bit, hex, integer and float constants) becomes
``$n`` (numbered after the highest ``$n`` already present), comments are
dropped, and tokens are re-joined with single spaces where the original had
whitespace or a comment.  Identifiers and keywords are kept.  Text that does
not parse becomes ``<unparseable>``.
"""

from __future__ import annotations

from pglast.parser import fingerprint as _pg_fingerprint
from pglast.parser import parse_sql_json, scan

UNPARSEABLE = "<unparseable>"
_LITERALS = frozenset({"SCONST", "USCONST", "BCONST", "XCONST", "ICONST", "FCONST"})
_COMMENTS = frozenset({"SQL_COMMENT", "C_COMMENT"})


def fingerprint(sql: str) -> str:
    """libpg_query's statement fingerprint (hex); ``""`` if ``sql`` does not parse."""
    if "\x00" in sql:
        return ""
    try:
        return str(_pg_fingerprint(sql))
    except Exception:  # any failure means "no fingerprint"
        return ""


def normalize(sql: str) -> str:
    """``sql`` with every literal replaced by ``$n`` and comments removed."""
    if "\x00" in sql:
        return UNPARSEABLE
    try:
        parse_sql_json(sql)
        tokens = scan(sql)
    except Exception:  # unparseable text is never echoed
        return UNPARSEABLE
    highest = 0
    for token in tokens:
        if token.name == "PARAM":
            try:
                highest = max(highest, int(sql[token.start + 1 : token.end + 1]))
            except ValueError:
                return UNPARSEABLE
    parts: list[str] = []
    previous_end = -1
    gap = False
    for token in tokens:
        if token.start > previous_end + 1:
            gap = True
        previous_end = token.end
        if token.name in _COMMENTS:
            gap = True
            continue
        if gap and parts:
            parts.append(" ")
        gap = False
        if token.name in _LITERALS:
            highest += 1
            parts.append(f"${highest}")
        elif token.name == "UESCAPE":
            parts.append("UESCAPE")
        else:
            parts.append(sql[token.start : token.end + 1])
    return "".join(parts)
