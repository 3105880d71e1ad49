"""One client session: the forwarding loops between a client and its upstream.

Owns the two pumps (client -> upstream, upstream -> client), the calls into the
:class:`~tenantgate.hooks.Inspector` for every Query/Parse/Bind, substitution of
rejected messages, the response tracker, pinned-setting checks on
ParameterStatus, and ending the session cleanly (a FATAL, never a traceback).
Start-up and login live in :mod:`tenantgate.handshake`; the listener in
:mod:`tenantgate.server`.

Longer than the other modules on purpose: the fast paths (``_known_query``,
``_bound_execute``, and the C lane's hand-over, ``_lane_request``) each do in
one pass exactly what the general path (``_drain_client``,
``_client_message``) does for the same messages, so they stay in one class,
next to the code they must keep matching.  The lane itself is ``_lane.c``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, cast

from tenantgate.compiled import lane_class
from tenantgate.errors import (
    PgError,
    ProtocolError,
    RemoteProtocolError,
    TenantgateError,
    idle_client_timeout,
    internal_error,
    protocol_violation,
    rate_limited,
    rejected,
    upstream_lost,
)
from tenantgate.hooks import Inspector, NullObserver, PortalInfo, SessionObserver
from tenantgate.injection import FIRST_HIDDEN, StatementShape, TenantInjector, is_internal_name
from tenantgate.protocol.backend import ErrorResponse, ParameterDescription, ParameterStatus
from tenantgate.protocol.framing import HeldBytes, frame, invalid_length, scan_frames, uint32_at
from tenantgate.protocol.frontend import Bind, Close, Describe, Execute, Parse, Query, Sync
from tenantgate.tracker import SETTLED_IN_BLOCK, Action, Kind, Pending, ResponseTracker
from tenantgate.upstream import LEXING_PINS, UpstreamConnection

if TYPE_CHECKING:
    from tenantgate._lane import Lane

log: Final = logging.getLogger("tenantgate.session")

# A statement that fails to parse upstream with SQLSTATE 42601: sent in place of
# a rejected message, so the server itself produces the error (and skips the
# rest of a pipeline) at exactly the position the client expects it.
REJECT_SQL: Final = "tenantgate: statement rejected by policy"
REJECT_STATEMENT: Final = "__tenantgate_rejected"
UPSTREAM_MAX_MESSAGE: Final = 1024 * 1024 * 1024 + 64
_PARSE_REJECT: Final = Parse(REJECT_STATEMENT, REJECT_SQL).encode()
# Client messages forwarded without a look: Flush, CopyData, CopyDone, CopyFail.
_CLIENT_PASSTHROUGH: Final = frozenset(b"Hdcf")
# Client messages that start a statement (counted by the rate limit).
_STATEMENT_STARTS: Final = frozenset(b"QE")
# Backend messages whose payload the proxy reads (errors, status, tags, settings, types).
_READ_PAYLOAD: Final = frozenset(b"EZCSt")
_QUERY_REJECT: Final = Query(REJECT_SQL).encode()
_FORWARD: Final = Action.FORWARD
# The clock of statement durations (a C static once compiled, not a globals lookup).
_perf_counter: Final = time.perf_counter
# What follows the Bind when a driver runs a prepared statement on the unnamed portal.
_EXECUTE_SYNC: Final = Execute("", 0).encode() + Sync().encode()
_DESCRIBE_EXECUTE_SYNC: Final = Describe("P", "").encode() + _EXECUTE_SYNC
# The steady-state lane's class (_lane.c), or None: the compiled build is not in use
# or TENANTGATE_LANE=0.
_LANE: Final = lane_class()
_PARSE_OR_BIND: Final = frozenset(b"PB")  # the first message of a chunk _bound_execute may take
_LANE_STARTS: Final = frozenset(b"PBQ")  # the first message of a chunk the lane may take
# What lane.client says it took (test_lane checks them against _lane's): a request
# that changes nothing the injector tracks (True), or transaction control
# (_lane.TOOK_CONTROL), or else a Query with the injector's prefix spliced in.
_TOOK: Final = 1
_TOOK_CONTROL: Final = 2
_FUNCTION_CALL_REJECTION: Final = rejected(
    "function_call",
    "the FunctionCall protocol message is not allowed",
    "Call functions with a SELECT statement instead.",
)


class SessionEnded(Exception):
    """Internal: the session must end, optionally telling the client why."""

    def __init__(self, error: PgError | None) -> None:
        super().__init__(str(error))
        self.error = error


@dataclass(slots=True)
class SessionInfo:
    """Identity of a logged-in session (what logs, metrics and cancel need)."""

    session_id: str
    tenant: str
    user: str
    peer: str
    protocol_minor: int
    process_id: int = 0
    secret_key: bytes = b""
    started: float = 0.0


class Session:
    """Forwards one authenticated client to its upstream connection."""

    def __init__(
        self,
        info: SessionInfo,
        client_reader: asyncio.StreamReader,
        client_writer: asyncio.StreamWriter,
        upstream: UpstreamConnection,
        inspector: Inspector,
        max_message_bytes: int,
        injector: TenantInjector | None = None,
    ) -> None:
        self.info = info
        self._client_reader = client_reader
        self._client_writer = client_writer
        self.upstream = upstream
        self.inspector = inspector
        self.injector = injector
        self.tracker = ResponseTracker()
        self._closing_error: PgError | None = None
        self._fatal_forwarded = False
        self._upstream_held = HeldBytes()  # an incomplete server message
        self._deferred = False  # a message waits for the rate limit (token reserved)
        # The rate limit's answer for the next statement, already asked by _known_query.
        self._rate_decided: tuple[float | None] | None = None
        self._upstream_gone = asyncio.Event()
        # Client bytes not handled yet: an incomplete message, or messages the rate
        # limit deferred (complete; handled when the delay is over).
        self._client_held = HeldBytes()
        self._max_message = max_message_bytes
        # The rate limit (TenantLimiter.reserve): called with the tenant per statement.
        self.rate_limit: Callable[[str], float | None] | None = None
        self.rate: float | None = None
        self.idle_timeout_s: float | None = None
        self._loop = asyncio.get_running_loop()
        self._last_activity = self._loop.time()
        self._finished: asyncio.Future[SessionEnded | None]
        self._client_transport: asyncio.Transport
        self._upstream_transport: asyncio.Transport
        self.observer: SessionObserver = NullObserver()
        self.tracker.on_complete = self._request_done
        # The steady-state lane (start_lane), when this session has one, and whether a
        # request it forwarded awaits its answer (set when its client() takes one,
        # cleared when its upstream() answers it or it hands it over: _lane_request),
        # so that other traffic pays no call into it.
        self._lane: Lane | None = None
        self._lane_busy = False

    def _request_done(self, entry: Pending, ok: bool) -> None:
        # A Query or Execute.  Rejections were reported when inspected; statements the
        # server skipped after an earlier error never ran.
        if entry.rejection is None and not entry.skipped:
            self.observer.request_done(entry, ok)

    @staticmethod
    def new_cancel_key(protocol_minor: int) -> tuple[int, bytes]:
        """Proxy-generated cancel key: 4+4 bytes for 3.0, 4+32 for 3.2 (CSPRNG)."""
        pid = secrets.randbits(31) or 1
        return pid, secrets.token_bytes(32 if protocol_minor >= 2 else 4)

    @property
    def busy(self) -> bool:
        """A client request is running upstream (cancel is forwarded only then)."""
        return self.tracker.busy_with_client_work or self._lane_busy

    @property
    def quiet(self) -> bool:
        """Nothing outstanding upstream and no transaction block open."""
        tracker = self.tracker
        return tracker.idle and tracker.status == "I" and not self._lane_busy

    def start_lane(self) -> None:
        """Give this session the steady-state lane (``_lane.c``) if it may have one.

        The lane checks and forwards, in C, a [Parse +] Bind [+ Describe] + Execute +
        Sync of a statement the inspector taught it (a named one, or the unnamed one
        with its known Parse), a Query of a text shape the inspector taught it, a
        transaction-control Query the inspector allowed before by its bytes, in
        enforce mode also any other Query the inspector allowed before by its bytes
        (what _known_query takes from the inspector's table), and the answer to any
        of them when that comes whole; everything else stays on the Python path.
        In rls/both mode, outside a block that has the tenant, it takes only the
        transaction control and the text shapes, spliced (_lane_client).  Only if
        the observer can take its tallies (not when every statement is audited)
        and the inspector can teach it.
        """
        if _LANE is None or self._lane is not None:
            return
        lane = _LANE(
            self._upstream_transport.write,
            self._client_transport.write,
            self._lane_request,
            self.info.tenant.encode(),
            self._max_message,
            self._lane_query,
            known_queries=self.injector is None,
            splice=None if self.injector is None else self.injector.query_prefix,
        )
        if self.observer.attach_lane(lane) and self.inspector.attach_lane(lane):
            self._lane = lane
        else:
            lane.release()

    def replace_inspector(self, inspector: Inspector) -> None:
        """Check the next statements with ``inspector`` (a reload's new policy), which
        takes over the prepared statements the server holds for this session."""
        lane = self._lane
        if lane is not None:
            lane.hand_over()  # its request, to the inspector that allowed it
        inspector.inherit(self.inspector)
        self.inspector = inspector
        if lane is not None and not inspector.attach_lane(lane):
            self._lane = None
            lane.release()

    def _lane_request(
        self, info: object, describe: bool, started: float, parse_payload: bytes | None
    ) -> None:
        """The lane hands over the request it forwarded: what _bound_execute does for
        the same request (the known Parse registered with the inspector, the one
        tracker entry), timed from when the lane sent it."""
        self._lane_busy = False
        parse_done = None
        if parse_payload is not None:
            parse = self.inspector.known_parse(parse_payload)
            if parse is None:  # cannot be: nothing ran since the lane checked it
                raise TenantgateError("the lane's Parse is unknown to the inspector")
            parse_done = self._parse_done(parse)
        portal = cast(PortalInfo, info)
        entry = _statement_entry(Kind.EXECUTE, portal.command, portal.sql, portal.would_reject)
        entry.started = started
        self.tracker.expect_bound(entry, describe, parse_done)

    def _lane_query(self, sql: str, command: str, started: float, spliced: bool) -> None:
        """The lane hands over the known Query it forwarded: the tracker entry
        _known_query makes for it (with the injected statement to hide, if the
        lane spliced it in), timed from when the lane sent it."""
        self._lane_busy = False
        entry = self._expect_statement(Kind.QUERY, command, sql, False)
        entry.started = started
        if spliced and self.injector is not None:
            entry.hidden_statements = FIRST_HIDDEN
            entry.position_shifts = self.injector.prefix_shift

    async def run(self) -> None:
        """Forward until either side ends; always closes the upstream connection.

        After the handshake the stream transports get plain protocol callbacks:
        each chunk is handled synchronously in ``data_received`` (no coroutine
        switch per message) and backpressure pauses the other side's reading.
        Raises :class:`SessionEnded` when the client must be told why.
        """
        self._loop = loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        if self.idle_timeout_s is not None:
            loop.call_later(self.idle_timeout_s, self._check_idle)
        client_left = bytes(getattr(self._client_reader, "_buffer", b""))
        upstream_left = bytes(getattr(self.upstream.reader, "_buffer", b""))
        self._client_transport = cast(asyncio.Transport, self._client_writer.transport)
        self._upstream_transport = cast(asyncio.Transport, self.upstream.writer.transport)
        self._client_transport.set_protocol(_Side(self, client=True))
        self._upstream_transport.set_protocol(_Side(self, client=False))
        self.start_lane()
        if upstream_left:
            self.upstream_data(upstream_left)
        if client_left:
            self.client_data(client_left)
        # Reading resumes only now: the stream protocol may have paused it.
        for transport in (self._client_transport, self._upstream_transport):
            if not transport.is_closing() and not transport.is_reading():
                transport.resume_reading()
        try:
            ended = await self._finished
        finally:
            lane, self._lane = self._lane, None
            if lane is not None:
                lane.release()  # its request, if any, to the tracker: failed below
            self.tracker.fail_all()
            self.upstream.close()
        if ended is not None:
            raise ended

    async def wait_upstream_closed(self, limit_s: float) -> None:
        """Let the upstream transport finish closing (a TLS close needs the loop)."""
        if not hasattr(self, "_upstream_transport"):
            return  # run() never started: the stream transport closes on its own
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._upstream_gone.wait(), limit_s)

    def end(self, error: PgError | None) -> None:
        """Ask the session to end (reload removed the tenant, shutdown...)."""
        self._closing_error = error
        self.upstream.close()

    def _finish(self, ended: SessionEnded | None) -> None:
        if not self._finished.done():
            self._finished.set_result(ended)

    def _guard(self, handler: Callable[[bytes], None], data: bytes) -> None:
        """Run a data handler; any failure ends the session (never the proxy)."""
        if self._finished.done():
            return
        try:
            handler(data)
        except Exception as exc:
            self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        """A handler raised: end the session with the error the client should see."""
        if isinstance(exc, SessionEnded):
            self._finish(exc)
        elif isinstance(exc, ProtocolError):
            log.info("session %s: protocol error: %s", self.info.session_id, exc)
            self._finish(SessionEnded(protocol_violation(str(exc))))
        else:
            log.error("session %s: unexpected error", self.info.session_id, exc_info=exc)
            self._finish(SessionEnded(internal_error()))

    def side_closed(self, client: bool) -> None:
        if not client:
            self._upstream_gone.set()
        if client:
            self._finish(None)
        else:
            error = self._closing_error or (None if self._fatal_forwarded else upstream_lost())
            self._finish(SessionEnded(error))

    def side_paused(self, client: bool, paused: bool) -> None:
        """The ``client`` (or upstream) transport's write buffer is full/drained."""
        other = self._upstream_transport if client else self._client_transport
        if other.is_closing():
            return
        if paused:
            other.pause_reading()
        else:
            other.resume_reading()

    # --- client -> upstream ---------------------------------------------------------

    def client_data(self, data: bytes) -> None:
        # The per-chunk path: the guard of _guard() inlined.
        if self._finished.done():
            return
        try:
            if self.idle_timeout_s is not None:
                self._last_activity = self._loop.time()
            lane = self._lane
            if lane is not None:
                settled = (
                    self.tracker.settled
                    if data[0] in _LANE_STARTS
                    and self.rate_limit is None
                    and not self._deferred
                    and not len(self._client_held)
                    else 0
                )
                # False: not its case (its earlier request handed over).
                took = self._lane_client(lane, data, settled) if settled else 0
                if took:
                    self._lane_busy = True
                    if took != _TOOK and self.injector is not None:
                        self.injector.lane_forwarded(took == _TOOK_CONTROL)
                    return  # checked, counted and forwarded by the lane
                if self._lane_busy:
                    lane.hand_over()
            self.observer.traffic(len(data), 0)
            held = self._client_held
            if self._deferred:
                held.add(data)  # handled when the rate limit's delay is over
            elif len(held):
                buffer = held.join(data)
                if buffer is not None:
                    self._drain_client(buffer)
            else:
                first = data[0]
                if first == 0x51:
                    if not self._known_query(data):
                        self._drain_client(data)
                elif first not in _PARSE_OR_BIND or not self._bound_execute(data):
                    self._drain_client(data)
        except Exception as exc:
            self._failed(exc)

    def _lane_client(self, lane: Lane, data: bytes, settled: int) -> int:
        """Offer the lane a chunk sent while the tracker is ``settled``: what
        lane.client returns (0: not taken).  In enforce mode whenever; in rls/both
        mode unless something is due at a Sync, with ``splice`` outside a block
        that has the tenant (there every transaction needs the tenant injected:
        the lane takes only transaction control, and text shapes with the
        injector's prefix in front)."""
        in_block = settled == SETTLED_IN_BLOCK
        injector = self.injector
        if injector is None:
            return lane.client(data, in_block)
        if injector.waits_for_sync:
            return 0
        return lane.client(data, in_block, not (in_block and injector.tenant_in_block))

    def _drain_client(self, buffer: bytes) -> None:
        """Handle every complete client message, unless the rate limit defers one.

        ``buffer`` is what the session held joined with the chunk just
        received, or that chunk alone when nothing was held (the common case:
        no copy).  What is left over (an incomplete message, or messages
        deferred by the rate limit) is held for later.  Messages the proxy does
        not change are forwarded as runs of raw bytes.
        """
        frames, consumed = scan_frames(buffer, self._max_message)
        if self.injector is not None:
            self.injector.observe_state(self.tracker.idle_in_block)
        out: list[bytes] = []
        run_start = 0
        stop = consumed
        for msg_type, start, end in frames:
            if msg_type in _CLIENT_PASSTHROUGH:
                continue
            header = start - 5
            if msg_type in _STATEMENT_STARTS and self.rate_limit is not None:
                if self._deferred:
                    self._deferred = False  # this message's token is already reserved
                else:
                    if self._rate_decided is not None:  # taken by _known_query for this message
                        (delay,), self._rate_decided = self._rate_decided, None
                    else:
                        delay = self._reserve_rate(self.rate_limit)
                    if delay is not None and delay > 0:
                        self._deferred = True
                        self._client_transport.pause_reading()
                        self._loop.call_later(delay, self._resume_deferred)
                        stop = header
                        break
                    if delay is None:
                        if run_start < header:
                            out.append(buffer[run_start:header])
                        out.append(self._rate_rejection(msg_type, buffer[start:end]))
                        run_start = end
                        continue
            if msg_type == 0x58:  # Terminate
                out.append(buffer[run_start:end])
                self._upstream_transport.write(b"".join(out))
                self._finish(None)
                return
            replacement = self._client_message(msg_type, buffer[start:end])
            if replacement is None:
                continue
            if run_start < header:
                out.append(buffer[run_start:header])
            out.append(replacement)
            run_start = end
        if run_start < stop:
            # Slicing all of a bytes object returns it: the common case copies nothing.
            out.append(buffer[run_start:stop])
        if stop < len(buffer):
            self._client_held.keep(buffer, stop)
        if out:
            self._upstream_transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _known_query(self, data: bytes) -> bool:
        """Forward a chunk that is exactly a Query the inspector can allow at once;
        False: not that case.

        The per-statement fast path: no framing or dispatch, just the
        inspector's table of whole messages it allowed before (same bytes, so
        the same single complete message), or else a single Query whose text
        the analysis cache answers without a parse (known text or text shape);
        in rls/both mode the injector's (cached) rewrite as for any Query.
        """
        if len(data) - 5 > self._max_message:
            return False  # the general path reports it
        # The rate limit first: a statement it defers or refuses is neither counted
        # as a cache hit nor marked sent here (the general path does either, once).
        if not self._rate_allows_now():
            return False
        known = self.inspector.known_query(data)
        if known is None:
            if self.rate_limit is not None:
                self._rate_decided = (0.0,)  # the token just taken is this statement's
            return False
        injector = self.injector
        if injector is not None:  # before the entry, as _drain_client does per chunk
            injector.observe_state(self.tracker.idle_in_block)
        entry = self._expect_statement(Kind.QUERY, known.command, known.sql, False)
        if injector is not None:  # rls/both: what _client_message does
            statements = self.inspector.last_statements()
            injected = self._injected_query(injector, entry, data[5:-1], statements)
            if injected is not None:
                data = injected
        self._upstream_transport.write(data)
        return True

    def _rate_allows_now(self) -> bool:
        """Ask the rate limit for the statement a fast path is about to forward.

        False unless it may run at once; the fast path then hands the chunk to
        the general path, which acts on this answer (wait or refuse) instead of
        asking again.
        """
        if self.rate_limit is None:
            return True
        delay = self._reserve_rate(self.rate_limit)
        if delay == 0.0:
            return True
        self._rate_decided = (delay,)
        return False

    def _reserve_rate(self, reserve: Callable[[str], float | None]) -> float | None:
        """One statement's token: seconds to wait (0.0: now), or None to refuse."""
        delay = reserve(self.info.tenant)
        if delay:
            self.observer.rate_limited()
        return delay

    def _expect_statement(
        self, kind: Kind, command: str, sql: str | None, would_reject: bool
    ) -> Pending:
        """Register a client's Query or Execute with the tracker, timed from now."""
        entry = _statement_entry(kind, command, sql, would_reject)
        self.tracker.expect(entry)
        return entry

    @staticmethod
    def _injected_query(
        injector: TenantInjector, entry: Pending, text: bytes, statements: Sequence[StatementShape]
    ) -> bytes | None:
        """The Query message with the tenant spliced in, or None if nothing is (a block
        that has it, transaction control): the client's message goes as it is.
        ``entry`` learns what to hide."""
        rewrite = injector.rewrite_query(text, statements)
        if not rewrite.shifts:  # nothing inserted: the text is the client's
            return None
        entry.hidden_statements = rewrite.hidden_statements
        entry.position_shifts = rewrite.shifts
        return frame(b"Q", rewrite.text + b"\x00")

    def _bound_execute(self, data: bytes) -> bool:
        """Handle a chunk that is [Parse +] Bind [+ Describe portal] + Execute + Sync of the
        unnamed portal (what libpq, pgbench and asyncpg send to run a statement with
        parameters, prepared or not); False: not that case, or the rate limit has a say
        (the general path then acts on its answer).

        Exactly what _drain_client and _client_message do for those messages, in
        one pass: the Parse and the Bind are checked (each replaced as the general
        path replaces it if refused), in rls/both mode the injector's messages go
        before the Execute as they would there, the rest is forwarded as is.
        """
        if len(data) < 5:
            return False
        parse_end = 0
        if data[0] == 0x50:  # Parse
            length = uint32_at(data, 1)
            parse_end = 1 + length
            if length < 4 or length - 4 > self._max_message or len(data) < parse_end + 5:
                return False
        length = uint32_at(data, parse_end + 1)
        end = parse_end + 1 + length
        if data[parse_end] != 0x42 or length < 4 or length - 4 > self._max_message:
            return False  # the general path reports it
        tail = data[end:]
        if tail == _EXECUTE_SYNC:
            describe = False
        elif tail == _DESCRIBE_EXECUTE_SYNC:
            describe = True
        else:
            return False
        if length == 4 or data[parse_end + 5] != 0 or not self._rate_allows_now():
            return False  # a named portal (or an empty Bind the general path reports)
        tracker, injector = self.tracker, self.injector
        if injector is not None:  # before any entry, as _drain_client does per chunk
            injector.observe_state(tracker.idle_in_block)
        inspector = self.inspector
        parse_instead = known_parse = None
        if parse_end:
            # A Parse the inspector knows by its bytes is registered with it now; its
            # tracker entry comes with the Bind's, below (no answer can resolve it
            # in between).
            known_parse = inspector.known_parse(data[5:parse_end])
            if known_parse is None:
                parse_instead = self._client_parse_payload(data[5:parse_end])
            elif tracker.skipping:
                # Resolved (skipped) the moment it is expected, as on the general
                # path: before the Bind is checked against the statement registry.
                self._expect_parse(known_parse)
                known_parse = None
        bind_payload = data[parse_end + 5 : end]
        info = None if parse_instead is not None else inspector.known_bind(bind_payload)
        if info is not None and (injector is None or injector.runs_as_is(info.plain)):
            # Allowed in place, nothing to inject: the request is one tracker entry.
            entry = _statement_entry(Kind.EXECUTE, info.command, info.sql, info.would_reject)
            parse_done = None if known_parse is None else self._parse_done(known_parse)
            tracker.expect_bound(entry, describe, parse_done)
            if injector is not None:
                injector.after_sync()  # as below
            self._upstream_transport.write(data)  # as received
            return True
        if known_parse is not None:
            self._expect_parse(known_parse)
        if info is None:
            bind_instead = self._client_bind(Bind.decode(bind_payload))
        else:
            bind_instead = None
            tracker.expect(Pending(Kind.BIND))
        if describe:
            tracker.expect(Pending(Kind.DESCRIBE_PORTAL))
        injection = self._client_execute("")
        if injector is not None:
            injector.after_sync()
        tracker.expect(Pending(Kind.SYNC))
        if parse_instead is None and bind_instead is None and injection is None:
            self._upstream_transport.write(data)  # as received
        else:
            execute_at = len(data) - len(_EXECUTE_SYNC)
            pieces = (
                data[:parse_end] if parse_instead is None else parse_instead,
                data[parse_end:end] if bind_instead is None else bind_instead,
                data[end:execute_at],  # the Describe, if any
                injection or b"",
                data[execute_at:],
            )
            self._upstream_transport.write(b"".join(pieces))
        return True

    def _client_execute(self, portal: str) -> bytes | None:
        """Register a client's Execute of ``portal``; in rls/both mode, what the injector
        sends before it (its responses registered to be hidden), or None."""
        info = self.inspector.portal_info(portal)
        injector = self.injector
        injection = None
        if injector is not None:
            tracker = self.tracker
            parsing = not injector.prepared
            injection = injector.before_execute(info.transaction_control)
            if injection is not None:
                if parsing:
                    tracker.expect(
                        Pending(Kind.PARSE, injected=True, on_done=self._prepared(injector))
                    )
                tracker.expect(Pending(Kind.BIND, injected=True))
                tracker.expect(Pending(Kind.EXECUTE, injected=True))
                tracker.expect(Pending(Kind.CLOSE, injected=True))
            if info.deallocates_all:
                injector.statements_dropped()
        self._expect_statement(Kind.EXECUTE, info.command, info.sql, info.would_reject)
        return injection

    def _client_parse_payload(self, payload: bytes) -> bytes | None:
        """:meth:`_client_parse` of a Parse's payload the inspector does not know by
        its bytes (``known_parse``: a driver that does not prepare sends the same
        unnamed Parse for every execution); remembered if allowed."""
        parse = Parse.decode(payload)
        instead = self._client_parse(parse)
        if instead is None:
            self.inspector.remember_parse(payload, parse)
        return instead

    def _client_parse(self, parse: Parse) -> bytes | None:
        """Inspect and register a client's Parse; the message to send instead, if refused."""
        error = _reserved(parse.name) or self.inspector.inspect_parse(parse)
        if error is not None:
            self.tracker.expect(Pending(Kind.PARSE, rejection=error))
            return Parse(parse.name, REJECT_SQL).encode()
        self._expect_parse(parse)
        return None

    def _expect_parse(self, parse: Parse) -> None:
        """Register an allowed Parse: the server's answer resolves it in the inspector."""
        self.tracker.expect(Pending(Kind.PARSE, on_done=self._parse_done(parse)))

    def _parse_done(self, parse: Parse) -> Callable[[bool], None]:
        # The inspector of the moment the server answers: a reload's new one has
        # inherited this Parse.
        return lambda ok: self.inspector.parse_resolved(parse, ok)

    def _closed(self, name: str) -> Callable[[bool], None]:
        # As _parse_done: the inspector of the moment the server answers.
        return lambda ok: self.inspector.close_resolved(name, ok)

    def _client_bind(self, bind: Bind) -> bytes | None:
        """Inspect and register a client's Bind; the message to send instead, if refused."""
        error = _reserved(bind.portal, bind.statement) or self.inspector.inspect_bind(bind)
        if error is not None:
            return self._reject_extended(error)
        self.tracker.expect(Pending(Kind.BIND))
        return None

    def _resume_deferred(self) -> None:
        if self._finished.done():
            return
        if not self._client_transport.is_closing():
            self._client_transport.resume_reading()
        self._guard(lambda _: self._drain_client(self._client_held.take()), b"")

    def _rate_rejection(self, msg_type: int, payload: bytes) -> bytes:
        error = rate_limited(self.rate or 0.0)
        if msg_type == 0x51:
            sql: str | None = Query.decode(payload).query
            command = command_of(sql or "")
        else:
            info = self.inspector.portal_info(Execute.decode(payload).portal)
            sql, command = info.sql, info.command
        self.observer.rejected("rate_limit", sql or "", command, False)
        return self._reject_query(error) if msg_type == 0x51 else self._reject_extended(error)

    def _check_idle(self) -> None:
        timeout = self.idle_timeout_s
        if timeout is None or self._finished.done():
            return
        idle_for = self._loop.time() - self._last_activity
        if idle_for >= timeout and self.quiet:
            self._finish(SessionEnded(idle_client_timeout()))
            return
        self._loop.call_later(max(timeout - idle_for, 0.05), self._check_idle)

    def _client_message(self, msg_type: int, payload: bytes) -> bytes | None:
        """Inspect one client message; return what to send upstream instead, or None."""
        tracker, inspector, injector = self.tracker, self.inspector, self.injector
        match msg_type:
            case 0x51:  # Query
                sql = _query_text(payload)
                error = inspector.inspect_query(sql)
                if error is not None:
                    return self._reject_query(error)
                inspector.query_sent()
                entry = self._expect_statement(
                    Kind.QUERY, inspector.last_command(), sql, inspector.last_would_reject
                )
                inspector.remember_query(frame(b"Q", payload))
                if injector is not None:
                    statements = inspector.last_statements()
                    if any(s.tag == "DEALLOCATE ALL" for s in statements):
                        injector.statements_dropped()
                    return self._injected_query(injector, entry, payload[:-1], statements)
                return None
            case 0x50:  # Parse
                return self._client_parse(Parse.decode(payload))
            case 0x42:  # Bind
                return self._client_bind(Bind.decode(payload))
            case 0x45:  # Execute
                portal = Execute.decode(payload).portal
                if (error := _reserved(portal)) is not None:
                    return self._reject_extended(error)
                injection = self._client_execute(portal)
                if injection is not None:
                    return injection + frame(b"E", payload)
            case 0x44:  # Describe
                describe = Describe.decode(payload)
                if (error := _reserved(describe.name)) is not None:
                    return self._reject_extended(error)
                if describe.kind == "S":
                    tracker.expect(
                        Pending(
                            Kind.DESCRIBE_STATEMENT,
                            on_parameter_description=self._described(describe.name),
                        )
                    )
                else:
                    tracker.expect(Pending(Kind.DESCRIBE_PORTAL))
            case 0x43:  # Close
                close = Close.decode(payload)
                if (error := _reserved(close.name)) is not None:
                    return self._reject_extended(error)
                if close.kind == "S":
                    tracker.expect(Pending(Kind.CLOSE, on_done=self._closed(close.name)))
                else:
                    tracker.expect(Pending(Kind.CLOSE))
            case 0x53:  # Sync
                if injector is not None:
                    injector.after_sync()
                tracker.expect(Pending(Kind.SYNC))
            case 0x46:  # FunctionCall: calls any function by OID, bypassing SQL analysis
                return self._reject_query(_FUNCTION_CALL_REJECTION)
            case _:
                raise SessionEnded(protocol_violation(f"unexpected message type {msg_type:#04x}"))
        return None

    @staticmethod
    def _prepared(injector: TenantInjector) -> Callable[[bool], None]:
        name = injector.statement_name

        def done(ok: bool) -> None:
            if not ok and injector.statement_name == name:
                injector.prepared = False  # refused or skipped: Parse it again next time

        return done

    def _described(self, name: str) -> Callable[[bytes], None]:
        def record(payload: bytes) -> None:
            self.inspector.statement_described(name, ParameterDescription.decode(payload).type_oids)

        return record

    def _reject_query(self, error: PgError) -> bytes:
        self.tracker.expect(Pending(Kind.QUERY, rejection=error))
        return _QUERY_REJECT

    def _reject_extended(self, error: PgError) -> bytes:
        """Replace an extended-protocol message by a Parse that fails in its place."""
        self.tracker.expect(Pending(Kind.PARSE, rejection=error))
        return _PARSE_REJECT

    # --- upstream -> client ---------------------------------------------------------

    def upstream_data(self, data: bytes) -> None:
        # The per-chunk path: the guard of _guard() inlined.
        if self._finished.done():
            return
        try:
            lane = self._lane
            if self._lane_busy and lane is not None:
                if not len(self._upstream_held):
                    status = lane.upstream(data)
                    if status is not None:  # the whole answer to the lane's request, counted
                        self._lane_busy = False
                        self.tracker.status = status  # changed by transaction control
                        return
                lane.hand_over()  # if upstream() has not just done so
            self._upstream_chunk(data)
        except Exception as exc:
            self._failed(exc)

    def _upstream_chunk(self, data: bytes) -> None:
        """Route every complete server message; forward runs of unchanged ones as one slice.

        :meth:`ResponseTracker.pass_plain` consumes the runs of ordinary
        answers without a call per message; every other message goes through
        the framing checks (scan_frames' checks, inlined) and ``route``.
        """
        held = self._upstream_held
        if len(held):
            joined = held.join(data)
            if joined is None:
                return  # still inside one large message
            buffer = joined
        else:
            buffer = data
        tracker = self.tracker
        pass_plain = tracker.pass_plain
        size = len(buffer)
        run_start = 0
        out: list[bytes] = []
        pos = pass_plain(buffer, 0)
        while size - pos >= 5:
            msg_type = buffer[pos]
            length = uint32_at(buffer, pos + 1)
            end = pos + 1 + length
            if length < 4 or length - 4 > UPSTREAM_MAX_MESSAGE:
                raise invalid_length(msg_type, length, UPSTREAM_MAX_MESSAGE)
            if end > size:
                break
            payload = buffer[pos + 5 : end] if msg_type in _READ_PAYLOAD else b""
            if msg_type == 0x53:  # ParameterStatus
                self._check_pinned(payload)
            action, replacement = tracker.route(msg_type, payload)
            if action is _FORWARD:
                if msg_type == 0x45 and _is_fatal(payload):
                    self._fatal_forwarded = True
            else:
                if run_start < pos:
                    out.append(buffer[run_start:pos])
                if replacement is not None:
                    out.append(replacement)
                run_start = end
            pos = pass_plain(buffer, end)
        if run_start < pos:
            # Slicing all of a bytes object returns it: the common case copies nothing.
            out.append(buffer[run_start:pos])
        if pos < size:
            held.keep(buffer, pos)
        if out:
            chunk = out[0] if len(out) == 1 else b"".join(out)
            self.observer.traffic(0, len(chunk))
            self._client_transport.write(chunk)

    def _check_pinned(self, payload: bytes) -> None:
        status = ParameterStatus.decode(payload)
        expected = LEXING_PINS.get(status.name)
        if expected is not None and status.value != expected:
            raise SessionEnded(
                protocol_violation(
                    f"the server reported {status.name}={status.value!r}; session ended"
                )
            )


class _Side(asyncio.Protocol):
    """Transport callbacks of one side of a session, delegated to the session."""

    __slots__ = ("_client", "_session", "data_received")

    def __init__(self, session: Session, client: bool) -> None:
        self._session = session
        self._client = client
        # Bound once: the transport calls the session's handler with no hop.
        self.data_received = session.client_data if client else session.upstream_data  # type: ignore[method-assign]

    def eof_received(self) -> bool:
        self._session.side_closed(self._client)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._session.side_closed(self._client)

    def pause_writing(self) -> None:
        self._session.side_paused(self._client, paused=True)

    def resume_writing(self) -> None:
        self._session.side_paused(self._client, paused=False)


_LEADING_KEYWORD: Final = re.compile(r"\s*(\w+)")
_COMMANDS: Final = frozenset({"select", "insert", "update", "delete"})


def command_of(sql: str) -> str:
    """Cheap metric label for a statement the analyser did not describe (it may not parse)."""
    match = _LEADING_KEYWORD.match(sql)
    word = match.group(1).lower() if match else ""
    return word if word in _COMMANDS else "other"


def _statement_entry(kind: Kind, command: str, sql: str | None, would_reject: bool) -> Pending:
    """The tracker entry of a client's Query or Execute, timed from now."""
    entry = Pending(kind, command=command, sql=sql, would_reject=would_reject)
    entry.started = _perf_counter()
    return entry


def _query_text(payload: bytes) -> str:
    """The SQL of a Query payload: what Query.decode checks, without building a Query."""
    if payload.find(0) != len(payload) - 1:
        return Query.decode(payload).query  # raises the precise protocol error
    try:
        return payload[:-1].decode("utf-8")
    except UnicodeDecodeError:
        return Query.decode(payload).query


def _reserved(*names: str) -> PgError | None:
    for name in names:
        if name and is_internal_name(name):
            return rejected(
                "reserved_name",
                "statement and portal names starting with __tenantgate are reserved",
                "Use another name for your prepared statement or portal.",
            )
    return None


def _is_fatal(payload: bytes) -> bool:
    try:
        severity = ErrorResponse.decode(payload).get("V") or ""
    except RemoteProtocolError:
        return False
    return severity in ("FATAL", "PANIC")
