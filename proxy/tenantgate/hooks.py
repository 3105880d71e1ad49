"""Hook points where policy code inspects client statements.

The session calls an :class:`Inspector` for every Query, Parse and Bind before
anything reaches the upstream, and tells it when a Parse or Close resolved.
A hook returns None to allow, or the :class:`PgError` to show the client; the
session then substitutes the message with one that fails at the same position
upstream, so ordering and pipeline error semantics stay exactly PostgreSQL's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from tenantgate.errors import PgError
from tenantgate.injection import StatementShape
from tenantgate.protocol.frontend import Bind, Parse


class Inspector(Protocol):
    def inspect_query(self, sql: str) -> PgError | None:
        """A simple Query (all statements of the string)."""

    def inspect_parse(self, parse: Parse) -> PgError | None:
        """An extended-protocol Parse."""

    def inspect_bind(self, bind: Bind) -> PgError | None:
        """A Bind, with its parameter values."""

    def parse_resolved(self, parse: Parse, ok: bool) -> None:
        """The server answered a forwarded Parse (ParseComplete or error/skip)."""

    def close_resolved(self, name: str, ok: bool) -> None:
        """The server answered a forwarded Close of a prepared statement."""

    def statement_described(self, name: str, type_oids: tuple[int, ...]) -> None:
        """The server said which parameter types it inferred for statement ``name``."""

    def query_sent(self) -> None:
        """A simple Query was forwarded (it destroys the unnamed statement)."""

    def last_statements(self) -> Sequence[StatementShape]:
        """Statement boundaries of the Query just allowed (for rls injection)."""

    def portal_is_transaction_control(self, portal: str) -> bool:
        """Whether the statement bound to ``portal`` is BEGIN/COMMIT/ROLLBACK/..."""


class AllowAll:
    """An inspector that allows everything: for protocol tests only, never served."""

    def inspect_query(self, sql: str) -> PgError | None:
        return None

    def inspect_parse(self, parse: Parse) -> PgError | None:
        return None

    def inspect_bind(self, bind: Bind) -> PgError | None:
        return None

    def parse_resolved(self, parse: Parse, ok: bool) -> None:
        return None

    def close_resolved(self, name: str, ok: bool) -> None:
        return None

    def statement_described(self, name: str, type_oids: tuple[int, ...]) -> None:
        return None

    def query_sent(self) -> None:
        return None

    def last_statements(self) -> Sequence[StatementShape]:
        return ()

    def portal_is_transaction_control(self, portal: str) -> bool:
        return False
