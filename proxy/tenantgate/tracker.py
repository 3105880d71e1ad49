"""Pairs every request sent upstream with its responses (sans-IO).

Like PgBouncer's outstanding-request FIFO: each message the proxy sends
upstream that produces a response pushes a :class:`Pending` entry; each backend
message is routed to the entry at the head and the tracker decides whether
the client sees it unchanged, not at all (a response to something the proxy
injected) or replaced (the server's error for a substituted, rejected
message becomes the policy's rejection).  It also keeps the transaction status
from ReadyForQuery.  Any response that cannot be paired is a protocol error:
the session is closed rather than risk handing one client's rows to the wrong
request.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from enum import Enum, IntEnum
from typing import Final

from tenantgate.errors import PgError, RemoteProtocolError
from tenantgate.injection import original_position
from tenantgate.protocol.backend import ErrorResponse
from tenantgate.protocol.framing import uint32_at


class Kind(IntEnum):
    # An IntEnum: routing hashes kinds per message, and int hashing is C-level.
    QUERY = 1  # simple Query or a substituted FunctionCall: ends with 'Z'
    PARSE = 2  # '1'
    BIND = 3  # '2'
    EXECUTE = 4  # 'C', 'I' or 's' (after rows / copy)
    DESCRIBE_STATEMENT = 5  # 't' then 'T' or 'n'
    DESCRIBE_PORTAL = 6  # 'T' or 'n'
    CLOSE = 7  # '3'
    SYNC = 8  # 'Z'


# Final module constants: a C static once compiled, not an enum attribute per message.
_QUERY: Final = Kind.QUERY
_EXECUTE: Final = Kind.EXECUTE
_SYNC: Final = Kind.SYNC
_DESCRIBE_PORTAL: Final = Kind.DESCRIBE_PORTAL

# The parts of a bound request ([Parse +] Bind [+ Describe portal] + Execute + Sync)
# one EXECUTE entry stands for until answered (Pending.bound): the bits still awaited.
BOUND_BIND: Final = 1
BOUND_DESCRIBE: Final = 2
BOUND_EXECUTE: Final = 4
BOUND_SYNC: Final = 8
BOUND_PARSE: Final = 16
# ResponseTracker.settled: idle outside a transaction block, or inside one.
SETTLED_IDLE: Final = 1
SETTLED_IN_BLOCK: Final = 2

# What ends each kind of entry (besides an ErrorResponse).
_COMPLETES: Final[dict[Kind, frozenset[int]]] = {
    Kind.QUERY: frozenset(b"Z"),
    Kind.PARSE: frozenset(b"1"),
    Kind.BIND: frozenset(b"2"),
    Kind.EXECUTE: frozenset(b"CIs"),
    Kind.DESCRIBE_STATEMENT: frozenset(b"Tn"),
    Kind.DESCRIBE_PORTAL: frozenset(b"Tn"),
    Kind.CLOSE: frozenset(b"3"),
    Kind.SYNC: frozenset(b"Z"),
}
# Responses that may precede the completing one within an entry.
_INTERMEDIATE: Final[dict[Kind, frozenset[int]]] = {
    Kind.QUERY: frozenset(b"TDGHdc"),
    Kind.EXECUTE: frozenset(b"DGHdc"),
    Kind.DESCRIBE_STATEMENT: frozenset(b"t"),
}
ASYNC_TYPES: Final = frozenset(b"NSA")
_EMPTY: Final[frozenset[int]] = frozenset()
SYNTAX_ERROR: Final = "42601"


class Pending:
    """One request awaiting responses.

    ``injected``: the proxy sent it; the client never sees its responses.
    ``rejection``: the client's message was replaced by one that fails at the
    same position; the server's syntax error is shown as this error instead.
    ``hidden_statements``: for a simple Query, indices of statements the proxy
    prefixed/inserted whose responses are dropped.
    ``on_done``: called with True (completed) or False (failed or skipped).
    ``on_parameter_description``: called with the payload of the server's
    ParameterDescription for a Describe of a statement.
    ``bound``: non-zero for an EXECUTE entry that also stands for the Parse,
    Bind, Describe and Sync around it (see :meth:`ResponseTracker.expect_bound`):
    the BOUND_* bits of the parts whose answers are still awaited;
    ``parse_done``: the ``on_done`` of its Parse.

    A plain class, not a dataclass: one is made per request, and mypyc
    compiles an explicit ``__init__`` but leaves a dataclass's generated one
    interpreted (about 3 us per request, measured).
    """

    __slots__ = (
        "bound",
        "command",
        "failed",
        "hidden_statements",
        "injected",
        "kind",
        "on_done",
        "on_parameter_description",
        "parse_done",
        "position_shifts",
        "rejection",
        "rows",
        "skipped",
        "sql",
        "started",
        "statement_index",
        "would_reject",
    )

    def __init__(
        self,
        kind: Kind,
        injected: bool = False,
        rejection: PgError | None = None,
        hidden_statements: frozenset[int] = _EMPTY,
        on_done: Callable[[bool], None] | None = None,
        on_parameter_description: Callable[[bytes], None] | None = None,
        command: str = "other",
        sql: str | None = None,
        would_reject: bool = False,
        position_shifts: tuple[tuple[int, int], ...] = (),
    ) -> None:
        self.kind = kind
        self.injected = injected
        self.rejection = rejection
        self.hidden_statements = hidden_statements
        self.on_done = on_done
        self.on_parameter_description = on_parameter_description
        # For metrics and the audit log: what ran, since when (perf_counter), which text.
        self.command = command
        self.started = 0.0
        self.sql = sql
        # Counted at inspection already (dry run): not again when it completes.
        self.would_reject = would_reject
        # Never ran: the server skipped it after an earlier error before Sync.
        self.skipped = False
        # Text the proxy inserted into a simple Query (see injection.Rewrite.shifts).
        self.position_shifts = position_shifts
        self.statement_index = 0
        self.failed = False
        self.rows = 0
        self.bound = 0
        self.parse_done: Callable[[bool], None] | None = None

    def __repr__(self) -> str:
        flags = [name for name in ("injected", "skipped", "failed") if getattr(self, name)]
        return f"Pending({self.kind.name}, {self.command!r}{''.join(', ' + f for f in flags)})"


class Action(Enum):
    FORWARD = 0
    DROP = 1
    REPLACE = 2


_STATUSES: Final = {b"I": "I", b"T": "T", b"E": "E"}
_STATUS_BYTES: Final = {0x49: "I", 0x54: "T", 0x45: "E"}
_QUERY_ROWS: Final = frozenset(b"DT")  # DataRow, RowDescription
# Per kind: the one message that completes a plain entry in pass_plain (ReadyForQuery,
# which ends Query and Sync, is handled on its own).
_PLAIN_COMPLETE: Final[dict[Kind, int]] = {
    Kind.PARSE: 0x31,
    Kind.BIND: 0x32,
    Kind.CLOSE: 0x33,
}
_STATEMENT_END: Final = frozenset(b"CI")
_DESCRIBE_PORTAL_COMPLETES: Final = _COMPLETES[Kind.DESCRIBE_PORTAL]
_FORWARD: Final[tuple[Action, bytes | None]] = (Action.FORWARD, None)
_DROP: Final[tuple[Action, bytes | None]] = (Action.DROP, None)


def _count_rows(entry: Pending, buffer: bytes, start: int = 0, end: int | None = None) -> None:
    """Add the row count of a CommandComplete tag (SELECT n, INSERT 0 n, COPY n ...):
    the payload ``buffer[start:end]`` (read in place: no copy of it is made)."""
    if end is None:
        end = len(buffer)
    if end > start and buffer[end - 1] == 0:
        end -= 1
    # The count is the run of ASCII digits after the tag's last space; read byte by
    # byte (plain C once compiled) rather than sliced and converted with int().
    digits = end
    while digits > start and 0x30 <= buffer[digits - 1] <= 0x39:
        digits -= 1
    if digits == end or digits - 1 <= start or buffer[digits - 1] != 0x20:
        return
    rows = 0
    for position in range(digits, end):
        rows = rows * 10 + buffer[position] - 0x30
    entry.rows += rows


def _expanded(entry: Pending) -> list[Pending]:
    """The entries :meth:`ResponseTracker.expect` holds for what ``entry`` stands
    for: itself, or the parts of a bound request not answered yet."""
    bound = entry.bound
    if not bound:
        return [entry]
    entry.bound = 0
    parts: list[Pending] = []
    if bound & BOUND_PARSE:
        parts.append(Pending(Kind.PARSE, on_done=entry.parse_done))
    if bound & BOUND_BIND:
        parts.append(Pending(Kind.BIND))
    if bound & BOUND_DESCRIBE:
        parts.append(Pending(Kind.DESCRIBE_PORTAL))
    if bound & BOUND_EXECUTE:
        parts.append(entry)
    if bound & BOUND_SYNC:
        parts.append(Pending(Kind.SYNC))
    return parts


def _part_count(bound: int) -> int:
    return 1 if not bound else bin(bound).count("1")


def _shift_position(payload: bytes, shifts: tuple[tuple[int, int], ...]) -> bytes:
    """The ErrorResponse with its position ('P') in the client's own query text."""
    error = ErrorResponse.decode(payload)
    fields: list[tuple[str, str]] = []
    for code, value in error.fields:
        if code == "P" and value.isdigit():
            position = original_position(int(value), shifts)
            if position is None:
                continue  # it points into the proxy's own statement
            fields.append((code, str(position)))
        else:
            fields.append((code, value))
    return ErrorResponse(tuple(fields)).encode()


class ResponseTracker:
    """Routes backend messages to outstanding requests."""

    __slots__ = ("_pending", "_skipping", "on_complete", "status")

    def __init__(self) -> None:
        self._pending: deque[Pending] = deque()
        # An extended-protocol error arrived before the client sent its Sync.
        self._skipping = False
        self.status = "I"
        # Called with each completed statement entry (a client's Query or Execute)
        # for metrics and the audit log; may be None.
        self.on_complete: Callable[[Pending, bool], None] | None = None

    def expect(self, entry: Pending) -> None:
        if self._skipping:
            if entry.kind is not Kind.SYNC:
                # The server discards everything up to the next Sync: no response will come.
                entry.failed = entry.skipped = True
                self._done(entry, False)
                return
            self._skipping = False
        self._pending.append(entry)

    def expect_bound(
        self, entry: Pending, describe: bool, parse_done: Callable[[bool], None] | None = None
    ) -> None:
        """Register a client's [Parse +] Bind [+ Describe portal] + Execute + Sync as
        one entry.

        ``entry`` is the EXECUTE entry; it also stands for the Parse (if
        ``parse_done``, its entry's ``on_done``), the Bind, the Describe (if
        ``describe``) and the Sync, whose one-message answers
        :meth:`pass_plain` consumes in place.  Any other answer (an error, a
        notice, a suspended portal...) first turns it back into the entries
        :meth:`expect` would hold (:meth:`_expanded`), so every rule of the
        general path applies unchanged.  Saves three entries and their
        completions per statement on the commonest request of libpq-style drivers.
        """
        entry.bound = BOUND_BIND | BOUND_EXECUTE | BOUND_SYNC
        if describe:
            entry.bound |= BOUND_DESCRIBE
        if parse_done is not None:
            entry.bound |= BOUND_PARSE
            entry.parse_done = parse_done
        if self._skipping:
            for part in _expanded(entry):
                self.expect(part)
        else:
            self._pending.append(entry)

    def _expand_head(self) -> Pending:
        """The head entry, split into its parts first if it stands for several."""
        pending = self._pending
        head = pending.popleft()
        pending.extendleft(reversed(_expanded(head)))
        return pending[0]

    @property
    def skipping(self) -> bool:
        """An error ended the queue before a Sync: the server skips to the next Sync,
        so a request expected now is resolved as skipped at once."""
        return self._skipping

    @property
    def idle(self) -> bool:
        """No response outstanding."""
        return not self._pending

    @property
    def settled(self) -> int:
        """Where the steady-state lane may take a request (Session.start_lane): nothing
        outstanding and not skipping to a Sync, then SETTLED_IDLE outside a
        transaction block, SETTLED_IN_BLOCK inside one; else 0 (also in a failed block)."""
        if self._pending or self._skipping:
            return 0
        status = self.status
        if status == "I":
            return SETTLED_IDLE
        return SETTLED_IN_BLOCK if status == "T" else 0

    @property
    def idle_in_block(self) -> bool:
        """Nothing outstanding and the server is inside an explicit transaction block."""
        return self.status == "T" and not self._pending

    @property
    def busy_with_client_work(self) -> bool:
        """A client's request is running upstream (cancel is meaningful)."""
        return any(not p.injected for p in self._pending)

    def pass_plain(self, buffer: bytes, pos: int) -> int:
        """Route, without a call per message, the run of messages at ``pos`` the
        client sees unchanged; return where the first other message starts.

        The batch form of :meth:`route` for what nearly every answer consists
        of: while the head is a client entry with nothing injected, hidden,
        rejected or rewritten, RowDescription/DataRow/CommandComplete/
        EmptyQueryResponse/ReadyForQuery of a Query, DataRow/CommandComplete of
        an Execute, and the one-message answers of Parse/Bind/Close/Sync and of
        a portal Describe are consumed exactly as :meth:`route` would (same
        state changes, same callbacks).  Anything else, and any frame that is
        incomplete or malformed, stops the run: the caller routes it with
        :meth:`route` (and the framing checks) and calls this again.
        """
        pending = self._pending
        size = len(buffer)
        while pending:
            head = pending[0]  # read once per entry, not per message
            if head.injected or head.rejection is not None or head.position_shifts:
                return pos
            if head.hidden_statements or head.on_parameter_description is not None:
                return pos
            if head.bound:
                pos = self._pass_bound(head, buffer, pos)
                if pending and pending[0] is head:
                    return pos  # stopped inside it: the caller routes what follows
                continue
            kind = head.kind
            complete = _PLAIN_COMPLETE.get(kind, -1)
            while True:  # the messages of this entry
                if size - pos < 5:
                    return pos
                msg_type = buffer[pos]
                length = uint32_at(buffer, pos + 1)
                end = pos + 1 + length
                if length < 4 or end > size:
                    return pos
                if msg_type == 0x5A and (kind is _QUERY or kind is _SYNC):  # ReadyForQuery
                    status = _STATUS_BYTES.get(buffer[pos + 5]) if length == 5 else None
                    if status is None:
                        return pos
                    self.status = status
                    pending.popleft()
                    self._done(head, not head.failed)
                    pos = end
                    break
                if kind is _QUERY:
                    if msg_type in _QUERY_ROWS:
                        pos = end
                        continue
                    if msg_type not in _STATEMENT_END:
                        return pos
                    if msg_type == 0x43:
                        _count_rows(head, buffer, pos + 5, end)
                    head.statement_index += 1
                    pos = end
                    continue
                if kind is _EXECUTE:
                    if msg_type == 0x44:
                        pos = end
                        continue
                    if msg_type != 0x43:
                        return pos
                    _count_rows(head, buffer, pos + 5, end)
                elif kind is _DESCRIBE_PORTAL:
                    if msg_type not in _DESCRIBE_PORTAL_COMPLETES:
                        return pos
                elif msg_type != complete:
                    return pos
                pending.popleft()
                self._done(head, True)
                pos = end
                break
        return pos

    def _pass_bound(self, head: Pending, buffer: bytes, pos: int) -> int:
        """:meth:`pass_plain` for a bound request at the head: consume its plain
        answer ([ParseComplete +] BindComplete [+ RowDescription or NoData] + DataRow* +
        CommandComplete + ReadyForQuery) as far as ``buffer`` holds it, the
        request completing and leaving the queue at its ReadyForQuery; return
        where it stopped.  Anything else stops it, for :meth:`route` to expand.
        """
        size = len(buffer)
        bound = head.bound
        while size - pos >= 5:
            msg_type = buffer[pos]
            length = uint32_at(buffer, pos + 1)
            end = pos + 1 + length
            if length < 4 or end > size:
                break
            if bound & BOUND_PARSE:
                if msg_type != 0x31:  # ParseComplete
                    break
                bound ^= BOUND_PARSE
                head.bound = bound  # before the Parse's callback runs
                parse_done = head.parse_done
                if parse_done is not None:
                    parse_done(True)
            elif bound & BOUND_BIND:
                if msg_type != 0x32:  # BindComplete
                    break
                bound ^= BOUND_BIND
            elif bound & BOUND_DESCRIBE:
                if msg_type not in _DESCRIBE_PORTAL_COMPLETES:
                    break
                bound ^= BOUND_DESCRIBE
            elif bound & BOUND_EXECUTE:
                if msg_type == 0x44:  # DataRow
                    pos = end
                    continue
                if msg_type != 0x43:  # CommandComplete
                    break
                _count_rows(head, buffer, pos + 5, end)
                bound ^= BOUND_EXECUTE
                head.bound = bound  # before the statement's completion is reported
                self._done(head, True)
            else:  # the Sync's ReadyForQuery
                status = _STATUS_BYTES.get(buffer[pos + 5]) if msg_type == 0x5A else None
                if status is None or length != 5:
                    break
                self.status = status
                self._pending.popleft()
                head.bound = 0  # a Sync entry's completion reports nothing: none is made
                return end
            pos = end
        head.bound = bound
        return pos

    @property
    def outstanding(self) -> int:
        """Requests awaiting answers, each part of a bound request counted on its own."""
        return sum(_part_count(entry.bound) for entry in self._pending)

    def route(self, msg_type: int, payload: bytes) -> tuple[Action, bytes | None]:
        """Decide what the client sees of one backend message.

        Returns (FORWARD, None), (DROP, None) or (REPLACE, replacement frame).
        Called once per backend message: the common cases come first.
        """
        pending = self._pending
        if not pending:
            if msg_type in ASYNC_TYPES or msg_type == 0x45:  # e.g. FATAL at admin shutdown
                return _FORWARD
            raise RemoteProtocolError(f"unexpected {chr(msg_type)!r} from the server")
        head = pending[0]
        if head.bound:
            head = self._expand_head()
        kind = head.kind
        hidden = head.injected or (
            head.hidden_statements and head.statement_index in head.hidden_statements
        )
        if msg_type == 0x44 and (kind is _EXECUTE or kind is _QUERY):  # DataRow
            return _DROP if hidden else _FORWARD
        if msg_type == 0x5A:  # ReadyForQuery
            if kind is not _QUERY and kind is not _SYNC:
                raise RemoteProtocolError(f"ReadyForQuery while awaiting {kind.name.lower()}")
            status = _STATUSES.get(payload)
            if status is None:
                raise RemoteProtocolError("ReadyForQuery: invalid status")
            self.status = status
            pending.popleft()
            self._done(head, not head.failed)
            # ReadyForQuery belongs to the whole request, never to a hidden statement.
            return _DROP if head.injected else _FORWARD
        if msg_type in ASYNC_TYPES:
            return _FORWARD
        if msg_type == 0x45:  # ErrorResponse
            return self._error(head, payload)
        if kind is _QUERY and msg_type in _STATEMENT_END:
            # C or I ends one statement of a (multi-statement) simple Query.
            if msg_type == 0x43 and not hidden:
                _count_rows(head, payload)
            head.statement_index += 1
            return _DROP if hidden else _FORWARD
        if msg_type in _COMPLETES[kind]:
            if msg_type == 0x43 and not hidden:
                _count_rows(head, payload)
            pending.popleft()
            self._done(head, True)
            return _DROP if hidden else _FORWARD
        if msg_type in _INTERMEDIATE.get(kind, _EMPTY):
            if msg_type == 0x74 and head.on_parameter_description is not None:
                head.on_parameter_description(payload)
            return _DROP if hidden else _FORWARD
        raise RemoteProtocolError(
            f"unexpected {chr(msg_type)!r} while awaiting {kind.name.lower()}"
        )

    def _error(self, head: Pending, payload: bytes) -> tuple[Action, bytes | None]:
        action = _FORWARD
        if head.rejection is not None:
            error = ErrorResponse.decode(payload)
            if error.sqlstate == SYNTAX_ERROR:
                action = (Action.REPLACE, ErrorResponse.from_error(head.rejection).encode())
        elif head.injected and head.kind is Kind.SYNC:
            action = _DROP
        elif head.position_shifts:
            action = (Action.REPLACE, _shift_position(payload, head.position_shifts))
        head.failed = True
        if head.kind in (Kind.QUERY, Kind.SYNC):
            # The rest of a string is skipped, or the commit at Sync failed:
            # ReadyForQuery still ends the entry.
            return action
        # Extended protocol: the server now skips everything up to the next Sync.
        self._pending.popleft()
        self._done(head, ok=False)
        while self._pending and self._pending[0].kind is not Kind.SYNC:
            if self._pending[0].bound:
                self._expand_head()  # its own Sync stops the skipping
                continue
            skipped = self._pending.popleft()
            skipped.failed = skipped.skipped = True
            self._done(skipped, ok=False)
        if not self._pending:
            self._skipping = True
        return action

    def _done(self, entry: Pending, ok: bool) -> None:
        if entry.on_done is not None:
            entry.on_done(ok)
        on_complete = self.on_complete
        if on_complete is not None and not entry.injected:
            kind = entry.kind
            if kind is _QUERY or kind is _EXECUTE:
                on_complete(entry, ok)

    def fail_all(self) -> None:
        """The upstream is gone: resolve every entry as failed."""
        while self._pending:
            entry = self._pending.popleft()
            for part in _expanded(entry):
                self._done(part, ok=False)
