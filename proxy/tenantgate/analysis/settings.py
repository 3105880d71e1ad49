"""SET / RESET / SET TRANSACTION rules and ``statement_timeout`` value parsing.

Owns the allow-list of settings a tenant may change (:data:`ALLOWED_SETTINGS`).
Everything else is refused: the tenant setting itself, settings that change
lexing (standard_conforming_strings, backslash_quote, client_encoding /
``SET NAMES``), search_path (``SET SCHEMA``), role and session_authorization,
``RESET ALL``, ``SET ... FROM CURRENT`` and ``SET TRANSACTION SNAPSHOT``.

``statement_timeout`` is reported in milliseconds so the proxy can cap it by the
tenant's limit.  ``SET statement_timeout TO DEFAULT`` and ``RESET
statement_timeout`` are reported as ``0``, which means the same as ``SET
statement_timeout = 0``: "no limit requested" -- the proxy must re-apply the
tenant cap.  Values use Postgres units (integer = ms; ``us ms s min h d``;
fractions are rounded to the nearest ms like the server does); anything the
analyser cannot read exactly is rejected (rule ``setting_value``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from .model import Rejected

Node = dict[str, Any]

ALLOWED_SETTINGS: frozenset[str] = frozenset(
    {
        "application_name",
        "timezone",
        "datestyle",
        "intervalstyle",
        "extra_float_digits",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
        "transaction_timeout",
        "client_min_messages",
        "bytea_output",
        "default_transaction_isolation",
        "default_transaction_read_only",
        "default_transaction_deferrable",
        "transaction_isolation",
        "transaction_read_only",
        "transaction_deferrable",
        "xmloption",
        "timezone_abbreviations",
        "lc_monetary",
        "lc_numeric",
        "lc_time",
    }
)

#: VAR_SET_MULTI forms (SET TRANSACTION ..., SET SESSION CHARACTERISTICS ...).
ALLOWED_MULTI: frozenset[str] = frozenset({"TRANSACTION", "SESSION CHARACTERISTICS"})

_IDENTITY = {"role": "SET ROLE", "session_authorization": "SET SESSION AUTHORIZATION"}
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60000.0, "h": 3600000.0, "d": 86400000.0}
_TIME_RE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-z]*)\s*")
_INT_MAX = 2147483647


#: Settings the tenant limits cap: reported so the proxy can refuse raising them.
CAPPED_SETTINGS = frozenset({"statement_timeout", "idle_in_transaction_session_timeout"})


def check_set(node: Node, tenant_setting: str) -> tuple[str, tuple[str, int] | None]:
    """Check a VariableSetStmt; returns (tag, (capped setting, new value in ms) or None).

    RESET and ``TO DEFAULT`` report nothing: they return to the session
    default, which for capped settings is the tenant limit the proxy put in
    the upstream startup packet.  An explicit 0 ("no limit") is reported.
    """
    kind = node.get("kind", "")
    name = str(node.get("name", "")).lower()
    tag = "RESET" if kind in ("VAR_RESET", "VAR_RESET_ALL") else "SET"
    if kind == "VAR_RESET_ALL":
        raise Rejected(
            "statement_class",
            "RESET ALL is not allowed",
            "reset the individual settings you changed instead",
        )
    if kind == "VAR_SET_MULTI":
        if node.get("name") in ALLOWED_MULTI:
            return tag, None
        raise Rejected(
            "statement_class",
            f"SET {node.get('name', '')} is not allowed",
            "transaction snapshots cannot be imported through tenantgate",
        )
    if name in _IDENTITY:
        raise Rejected(
            "statement_class",
            f"{_IDENTITY[name]} is not allowed",
            "tenantgate fixes the database role; connect as the tenant user",
        )
    if name == tenant_setting.lower():
        raise Rejected(
            "setting_change",
            f"changing {name} is not allowed",
            "tenantgate sets the tenant for you; remove this statement",
        )
    if name not in ALLOWED_SETTINGS:
        raise Rejected(
            "setting_change",
            f"changing setting {name} is not allowed",
            "only harmless session settings (application_name, TimeZone, "
            "DateStyle, statement_timeout, ...) may be changed",
        )
    if kind == "VAR_SET_CURRENT":
        raise Rejected(
            "setting_change", "SET ... FROM CURRENT is not allowed", "set an explicit value instead"
        )
    if name not in CAPPED_SETTINGS or kind in ("VAR_SET_DEFAULT", "VAR_RESET"):
        return tag, None
    args = node.get("args") or []
    if kind != "VAR_SET_VALUE" or len(args) != 1:
        raise _bad_timeout()
    return tag, (name, parse_timeout(args[0]))


def parse_timeout(arg: Node) -> int:
    """Milliseconds for one SET argument of statement_timeout (raises Rejected)."""
    const = arg.get("A_Const")
    if const is None:
        raise _bad_timeout()
    if "ival" in const:
        value = float(const["ival"].get("ival", 0))
        unit = ""
    else:
        text = const.get("fval", {}).get("fval") if "fval" in const else None
        if text is None:
            text = const.get("sval", {}).get("sval", "") if "sval" in const else None
        if text is None:
            raise _bad_timeout()
        match = _TIME_RE.fullmatch(str(text))
        if match is None:
            raise _bad_timeout()
        try:
            value = float(match.group(1))
        except ValueError as exc:  # pragma: no cover - regex guarantees a number
            raise _bad_timeout() from exc
        unit = match.group(2)
    if unit and unit not in _UNITS:
        raise _bad_timeout()
    ms = value * _UNITS.get(unit, 1.0)
    if math.isnan(ms) or ms < 0 or ms > _INT_MAX:
        raise _bad_timeout()
    return round(ms)


def _bad_timeout() -> Rejected:
    return Rejected(
        "setting_value",
        "statement_timeout value not understood",
        "use an integer number of milliseconds or a value like '5s' or '2min'",
    )
