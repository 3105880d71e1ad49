"""Hook points where policy code inspects client statements.

The session calls an :class:`Inspector` for every Query, Parse and Bind before
anything reaches the upstream, and tells it when a Parse or Close resolved.
A hook returns None to allow, or the :class:`PgError` to show the client; the
session then substitutes the message with one that fails at the same position
upstream, so ordering and pipeline error semantics stay exactly PostgreSQL's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Protocol

from tenantgate.errors import PgError
from tenantgate.injection import StatementShape
from tenantgate.protocol.frontend import Bind, Parse
from tenantgate.tracker import Pending

if TYPE_CHECKING:
    from tenantgate._lane import Lane


@dataclass(frozen=True, slots=True)
class PortalInfo:
    transaction_control: bool
    command: str
    sql: str | None
    would_reject: bool = False  # dry run: already counted as would_reject at Parse/Bind
    deallocates_all: bool = False  # DEALLOCATE ALL: drops the proxy's internal statement too

    @property
    def plain(self) -> bool:
        """Neither transaction control nor DEALLOCATE ALL: running it inside a
        transaction block changes nothing the rls/both injector tracks."""
        return not (self.transaction_control or self.deallocates_all)


UNKNOWN_PORTAL: Final = PortalInfo(False, "other", None)


class KnownQuery:
    """What the session needs of a Query allowed before: its text and metric label.

    A plain class: one is made per such Query, and mypyc compiles an explicit
    ``__init__`` but not a dataclass's generated one.
    """

    __slots__ = ("command", "sql")

    def __init__(self, sql: str, command: str) -> None:
        self.sql = sql
        self.command = command


class Inspector(Protocol):
    # Dry run: whether the Query or Parse just inspected would have been refused.
    last_would_reject: bool

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

    def portal_info(self, portal: str) -> PortalInfo:
        """What the statement bound to ``portal`` is (for injection and metrics)."""

    def last_command(self) -> str:
        """Metric label of the Query or Parse just inspected (select/insert/.../other)."""

    def known_query(self, message: bytes) -> KnownQuery | None:
        """A whole Query message (type byte included) allowed before exactly as it is,
        or one the inspector can allow without parsing it (a text of a known shape).

        Returns its text and metric label if this session may run it as is
        (nothing to rewrite, no limit to check), after doing what
        :meth:`inspect_query` and :meth:`query_sent` do for an allowed Query;
        None sends the message down the general path.  The per-statement fast path.
        """

    def remember_query(self, message: bytes) -> None:
        """The Query just inspected was allowed: :meth:`known_query` may answer for it."""

    def known_parse(self, payload: bytes) -> Parse | None:
        """A Parse's payload (its bytes after the length) that is exactly that of
        an unnamed-statement Parse remembered by :meth:`remember_parse` (a few, per
        session).

        Returns that Parse after doing what :meth:`inspect_parse` does when it
        allows it; None: decode and inspect it.
        """

    def remember_parse(self, payload: bytes, parse: Parse) -> None:
        """``parse`` (decoded from ``payload``) was just inspected and allowed:
        :meth:`known_parse` may answer for the same bytes."""

    def known_bind(self, payload: bytes) -> PortalInfo | None:
        """A Bind's payload, to the unnamed portal, that :meth:`inspect_bind` would
        allow outright: returns what the portal now is, having recorded it as
        :meth:`inspect_bind` does; None: decode and inspect it."""

    def inherit(self, previous: Inspector) -> None:
        """Take over what ``previous`` (the inspector a reload replaces) knew of the
        session's prepared statements and portals, judged again under this
        inspector's policy: the server keeps them across a reload."""

    def attach_lane(self, lane: Lane) -> bool:
        """Teach the session's steady-state lane what :meth:`known_bind` (and
        :meth:`known_parse` for the unnamed statement) allow by their bytes, and
        make it forget at every change; False: this inspector cannot (the session
        then has no lane)."""


class SessionObserver(Protocol):
    """Receives what a session did, for metrics and the audit log.

    Called on the event loop's hot path: implementations must not block.
    """

    def request_done(self, entry: Pending, ok: bool) -> None:
        """A client request (Query, or Execute) completed upstream, or failed."""

    def rejected(self, rule: str, sql: str, command: str, dry_run: bool) -> None:
        """A statement was refused (or, in dry run, would have been)."""

    def traffic(self, bytes_in: int, bytes_out: int) -> None:
        """Bytes received from and sent to the client."""

    def rate_limited(self) -> None:
        """A statement waits for the tenant's rate limit."""

    def closed(self) -> None:
        """The session ended."""

    def attach_lane(self, lane: Lane) -> bool:
        """Take the statements, rows and bytes the session's steady-state lane
        tallies (:meth:`Lane.take`) in place of calls per statement; False: this
        observer needs a call per statement (the session then has no lane)."""


class NullObserver:
    def request_done(self, entry: Pending, ok: bool) -> None:
        return None

    def rejected(self, rule: str, sql: str, command: str, dry_run: bool) -> None:
        return None

    def traffic(self, bytes_in: int, bytes_out: int) -> None:
        return None

    def rate_limited(self) -> None:
        return None

    def closed(self) -> None:
        return None

    def attach_lane(self, lane: Lane) -> bool:
        return True  # nothing to count


class AllowAll:
    """An inspector that allows everything: for protocol tests only, never served."""

    last_would_reject = False

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

    def portal_info(self, portal: str) -> PortalInfo:
        return UNKNOWN_PORTAL

    def last_command(self) -> str:
        return "other"

    def known_query(self, message: bytes) -> KnownQuery | None:
        return None

    def remember_query(self, message: bytes) -> None:
        return None

    def known_parse(self, payload: bytes) -> Parse | None:
        return None

    def remember_parse(self, payload: bytes, parse: Parse) -> None:
        return None

    def known_bind(self, payload: bytes) -> PortalInfo | None:
        return None

    def inherit(self, previous: Inspector) -> None:
        return None

    def attach_lane(self, lane: Lane) -> bool:
        return False
