"""rls mode: putting the tenant into every transaction, invisibly (sans-IO).

Owns *where* ``set_config('<tenant_setting>', <tenant>, true)`` goes and which
responses that costs, so :mod:`tenantgate.tracker` can drop exactly those:

* simple Query: the statement is spliced into the same string before the first
  statement that is not transaction control, and again after every
  transaction-control statement (a COMMIT inside a string starts a new
  implicit transaction; a ROLLBACK TO can revert a later set_config);
* extended protocol: before an Execute, when the transaction it runs in may not
  have the tenant yet (at session start, after every Sync, after a simple
  Query, after a transaction-control Execute), Bind + Execute + Close of a
  named internal statement with the tenant as a parameter (the tenant never
  appears as a literal, so pg_stat_statements never records it).

Never before transaction control itself: in an aborted transaction the
set_config would fail and make the server skip the client's ROLLBACK.
The value is transaction-local, so outside an injected transaction the
upstream session has no tenant and fail-closed RLS shows nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, Protocol

from tenantgate.protocol.frontend import Bind, Close, Execute, Parse

INTERNAL_STATEMENT: Final = "__tenantgate_set_tenant"
INTERNAL_PORTAL: Final = "__tenantgate_set_tenant_portal"
INTERNAL_PREFIX: Final = "__tenantgate"
REWRITE_CACHE_ENTRIES: Final = 256
_SAFE_VALUE: Final = re.compile(r"^[A-Za-z0-9_.:@$-]+$")
_NOTHING_HIDDEN: Final[frozenset[int]] = frozenset()
FIRST_HIDDEN: Final = frozenset((0,))


class StatementShape(Protocol):
    """What injection needs to know about one statement of a query string."""

    @property
    def transaction(self) -> str | None: ...
    @property
    def location(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def tag(self) -> str: ...  # the command tag, e.g. "SELECT" or "DEALLOCATE ALL"
    @property
    def command(self) -> str: ...  # the metric label: select/insert/update/delete/other


class Rewrite:
    """A simple Query with the tenant spliced in (a plain class: mypyc compiles this
    module, and a dataclass's ``__init__`` would stay interpreted)."""

    __slots__ = ("hidden_statements", "shifts", "text")

    def __init__(
        self, text: bytes, hidden_statements: frozenset[int], shifts: tuple[tuple[int, int], ...]
    ) -> None:
        self.text: Final = text
        self.hidden_statements: Final = hidden_statements
        # (character position in ``text``, characters inserted there): to map error
        # positions back.
        self.shifts: Final = shifts


def original_position(position: int, shifts: tuple[tuple[int, int], ...]) -> int | None:
    """Map a 1-based error position in the rewritten text to the client's text.

    None when it points into the proxy's own inserted text.
    """
    offset = position - 1
    moved = 0
    for start, size in shifts:
        if offset >= start + size:
            moved += size
        elif offset >= start:
            return None
    return offset - moved + 1


def _literal(value: str) -> str:
    # Tenant ids and setting names are validated by the policy model; check again
    # because this text goes into SQL (standard_conforming_strings is pinned on).
    if not _SAFE_VALUE.match(value):
        raise ValueError(f"unsafe value for an injected literal: {value!r}")
    return "'" + value + "'"


class TenantInjector:
    """Per-session injection state for one tenant."""

    __slots__ = (
        "_bind",
        "_execute",
        "_generation",
        "_in_block",
        "_needs_injection",
        "_query_injection",
        "_rewritten",
        "_setting",
        "_tenant",
        "prefix_shift",
        "prepared",
        "query_prefix",
        "tenant_in_block",
    )

    def __init__(self, tenant_setting: str, tenant: str) -> None:
        self._query_injection = (
            f"SELECT pg_catalog.set_config({_literal(tenant_setting)}, {_literal(tenant)}, true)"
        ).encode()
        # What a one-statement Query gets in front: the common case, see rewrite_query.
        self.query_prefix: Final = self._query_injection + b";"
        self.prefix_shift: Final = ((0, len(self.query_prefix)),)
        self._needs_injection = True
        # The tenant was set in the current explicit transaction block and no
        # transaction control ran since (a ROLLBACK TO could have reverted it).
        self.tenant_in_block = False
        # Set per chunk of client messages: the upstream is idle in that block.
        self._in_block = False
        # Rewrites depend only on the text (boundaries come from its cached analysis).
        self._rewritten: dict[tuple[bytes, bool], Rewrite] = {}
        self._setting = tenant_setting.encode()
        self._tenant = tenant.encode()
        # The internal statement is parsed lazily with the first injection, and again
        # under a new name after the client's DEALLOCATE ALL dropped it.
        self._generation = 0
        self.prepared = False
        self._bind = self._encode_bind()
        self._execute = Execute(INTERNAL_PORTAL, 0).encode() + Close("P", INTERNAL_PORTAL).encode()

    def _encode_bind(self) -> bytes:
        """The Bind of the internal statement with the setting and the tenant."""
        parameters = (self._setting, self._tenant)
        return Bind(INTERNAL_PORTAL, self.statement_name, (0,), parameters, ()).encode()

    @property
    def statement_name(self) -> str:
        return f"{INTERNAL_STATEMENT}_{self._generation}"

    def statements_dropped(self) -> None:
        """The client ran DEALLOCATE ALL: prepare the internal statement afresh.

        A new name, because the DEALLOCATE may not have run (an error before it).
        """
        self._generation += 1
        self.prepared = False
        self._bind = self._encode_bind()

    def observe_state(self, idle_in_block: bool) -> None:
        """Before a chunk of client messages: is the upstream idle in an explicit block?

        Then, if this block already has the tenant, statements up to the next
        transaction control need no injection (an error there aborts the block,
        and every later statement fails anyway until ROLLBACK).
        """
        self._in_block = idle_in_block and self.tenant_in_block

    def runs_as_is(self, plain: bool) -> bool:
        """Whether a client's Execute in the chunk just observed needs nothing
        injected and changes nothing here (:meth:`before_execute` would return
        None, :meth:`statements_dropped` is not due): the upstream is idle in a
        block that has the tenant, and the statement is ``plain`` (neither
        transaction control nor DEALLOCATE ALL)."""
        return self._in_block and plain

    @property
    def waits_for_sync(self) -> bool:
        """An Execute got the tenant injected and no Sync has come since: the
        session's lane takes nothing until one has (what a statement sent now
        joins is the Python path's to know)."""
        return not self._needs_injection

    # --- simple Query -----------------------------------------------------------------

    def rewrite_query(self, sql: bytes, statements: Sequence[StatementShape]) -> Rewrite:
        """The Query text with set_config spliced in, and the indices of the injected statements.

        ``statements`` carry byte offsets into ``sql``; an injection goes at the
        very start, or at the end of the previous statement (before its ';').
        """
        # A Query sent after Executes not yet Synced joins their transaction, which
        # this segment's injection already gave the tenant: injecting again would also
        # turn a one-statement Query into two, which PostgreSQL 18 commits at its end.
        has_tenant = self._in_block or not self._needs_injection
        self._needs_injection = True  # whatever the string does, the next Execute re-checks
        if len(statements) == 1 and statements[0].transaction is None:
            # Nearly every Query: what _rewrite makes of one statement, without the
            # per-text cache (texts with inlined values never repeat).
            self.tenant_in_block = True
            if has_tenant:
                return Rewrite(sql, _NOTHING_HIDDEN, ())
            return Rewrite(self.query_prefix + sql, FIRST_HIDDEN, self.prefix_shift)
        key = (sql, has_tenant)
        result = self._rewritten.get(key)
        if result is None:
            result = self._rewrite(sql, statements, has_tenant)
            if len(self._rewritten) >= REWRITE_CACHE_ENTRIES:
                self._rewritten.clear()
            self._rewritten[key] = result
        if not statements or any(s.transaction is not None for s in statements):
            self._control_ran()
        else:
            self.tenant_in_block = True
        return result

    def lane_forwarded(self, control: bool) -> None:
        """What :meth:`rewrite_query` records for a one-statement Query, or
        :meth:`before_execute` and :meth:`after_sync` for a bound statement, that
        the session's lane forwarded instead: transaction control (``control``), or
        a Query with :attr:`query_prefix` spliced in front.  (A plain statement in
        a block that has the tenant changes nothing here.)"""
        if control:
            self._control_ran()
        else:
            self._needs_injection = True
            self.tenant_in_block = True

    def _control_ran(self) -> None:
        """Transaction control went to the server: the next statement needs the tenant
        again (a new block, or a ROLLBACK TO that may have reverted it)."""
        self._needs_injection = True
        self.tenant_in_block = self._in_block = False

    def _rewrite(self, sql: bytes, statements: Sequence[StatementShape], in_block: bool) -> Rewrite:
        out = bytearray()
        inserted: list[tuple[int, int]] = []  # (byte offset in the result, byte length)
        copied = 0
        previous_end: int | None = None
        hidden: list[int] = []
        index = 0  # statement index in the rewritten string
        pending = not in_block  # the next non-transaction-control statement needs the tenant
        for statement in statements:
            if statement.transaction is not None:
                pending = True
            elif pending:
                if previous_end is None:
                    inserted.append((0, len(self._query_injection) + 1))
                    out += self._query_injection + b";"
                else:
                    out += sql[copied:previous_end]
                    inserted.append((len(out), len(self._query_injection) + 1))
                    out += b";" + self._query_injection
                    copied = previous_end
                hidden.append(index)
                index += 1
                pending = False
            index += 1
            previous_end = statement.location + statement.length if statement.length else len(sql)
        out += sql[copied:]
        text = bytes(out)
        # Error positions ('P') count characters of the text the server saw.
        shifts = tuple((len(text[:at].decode("utf-8", "replace")), size) for at, size in inserted)
        return Rewrite(text, frozenset(hidden), shifts)

    # --- extended protocol --------------------------------------------------------------

    def before_execute(self, transaction_control: bool) -> bytes | None:
        """Messages to send before a client Execute ([Parse+]Bind+Execute+Close), or None.

        When :attr:`prepared` is False the bytes start with the Parse of the
        internal statement, and it counts as prepared from now on (later
        injections in the same pipeline must not Parse it again); the caller
        resets :attr:`prepared` if the server refuses or skips that Parse.
        """
        if transaction_control:
            self._control_ran()
            return None
        if self._in_block:
            return None
        self.tenant_in_block = True
        if not self._needs_injection:
            return None
        self._needs_injection = False
        if self.prepared:
            return self._bind + self._execute
        sql = "SELECT pg_catalog.set_config($1, $2, true)"
        parse = Parse(self.statement_name, sql, (25, 25)).encode()
        self.prepared = True
        return parse + self._bind + self._execute

    def after_sync(self) -> None:
        self._needs_injection = True


def is_internal_name(name: str) -> bool:
    """Statement and portal names the proxy reserves for itself."""
    return name.startswith(INTERNAL_PREFIX)
