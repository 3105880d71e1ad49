"""The analyser's public value types and its internal short-circuit exception.

Owns: :class:`AnalysisPolicy` (what the analyser is told), :class:`Rejection`,
:class:`StatementAnalysis` and :class:`Analysis` (what it answers), and
:class:`Rejected`, the exception the walkers raise to stop at the first broken
rule.  Everything here is immutable so an :class:`Analysis` can be cached by
statement text and shared by every tenant and every connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

Command = Literal["select", "insert", "update", "delete", "other"]
TransactionKind = Literal[
    "begin",
    "commit",
    "rollback",
    "savepoint",
    "release",
    "rollback_to",
    "prepare",
    "set_transaction",
]


@dataclass(frozen=True, slots=True)
class AnalysisPolicy:
    """The part of the tenantgate config the analyser needs.

    ``scoped_tables`` keys are lowercase ``"table"`` (meaning ``public.table``) or
    ``"schema.table"``; values are the lowercase tenant column.
    """

    scoped_tables: Mapping[str, str]
    shared_tables: frozenset[str] = field(default_factory=frozenset)
    unknown_tables: Literal["reject", "allow"] = "reject"
    check_predicates: bool = True
    tenant_setting: str = "app.tenant_id"
    allowed_functions: frozenset[str] = frozenset()
    denied_functions: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Rejection:
    """Why a statement is refused.

    ``rule`` is a short stable snake_case id (a metric label); ``message`` and
    ``hint`` are human text that never contains a literal from the statement.
    """

    rule: str
    message: str
    hint: str


@dataclass(frozen=True, slots=True)
class StatementAnalysis:
    """What the proxy needs to know about one statement of a query string.

    ``location``/``length`` are *byte* offsets into the UTF-8 encoding of the
    query string (``length`` 0 means "to the end"), as libpg_query reports them.
    """

    command: Command
    tag: str
    transaction: TransactionKind | None
    location: int
    length: int
    tenant_constants: frozenset[str] = frozenset()
    tenant_params: frozenset[int] = frozenset()
    statement_timeout_ms: int | None = None
    param_count: int = 0
    idle_in_transaction_timeout_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Analysis:
    """The verdict for a whole query string (every statement in it).

    ``rejection`` None means allowed, subject to :func:`check_tenant` on the
    constants and to Bind-time checks of ``tenant_params``.  When a rejection is
    set, ``statements`` holds the statements analysed up to (not including) the
    refused one; the proxy must refuse the whole string.
    """

    statements: tuple[StatementAnalysis, ...]
    rejection: Rejection | None


class Rejected(Exception):
    """Raised inside the analyser to stop at the first broken rule."""

    def __init__(self, rule: str, message: str, hint: str) -> None:
        super().__init__(rule)
        self.rejection = Rejection(rule, message, hint)
