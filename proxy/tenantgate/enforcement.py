"""The policy inspector: applies the analyser's verdicts to one session.

Owns the per-session side of policy enforcement: looking up (cached) analyses
for Query and Parse, checking constants against this session's tenant,
capping ``SET statement_timeout`` by the tenant limit, dry-run accounting,
and the prepared-statement registry that checks Bind parameters against the
statement the *server* will actually run.  That registry is deliberately
pessimistic: until the server confirms a Parse, a Bind must satisfy every
candidate text the name could refer to (the old one and each pending one).

Longer than the other modules on purpose, like :mod:`tenantgate.session`: each
fast path here (``known_query``, ``known_parse``, ``known_bind``, and what it
teaches the C lane) answers from the same registry and verdict cache as the
general method it stands in for (``inspect_query``, ``inspect_parse``,
``inspect_bind``), and must change with it; one class keeps them side by side.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

from tenantgate.analysis import (
    Analysis,
    AnalysisCache,
    AnalysisPolicy,
    Rejection,
    check_tenant,
    matches_as_bytes,
    tenant_param_matches,
)
from tenantgate.analysis.textshapes import digits_of
from tenantgate.config import Policy
from tenantgate.errors import PgError, rejected
from tenantgate.hooks import UNKNOWN_PORTAL, Inspector, KnownQuery, PortalInfo
from tenantgate.injection import StatementShape, is_internal_name
from tenantgate.protocol.frontend import Bind, Parse, bind_params_at

if TYPE_CHECKING:
    from tenantgate._lane import Lane

log: Final = logging.getLogger("tenantgate.enforcement")
# Portals die at transaction end, which the inspector does not see; bound the map.
MAX_TRACKED_PORTALS: Final = 1000
# Portal descriptions remembered per session by statement text (memory: texts x sessions).
MAX_PORTAL_INFOS: Final = 64
# Verdicts per session, kept by analysis identity (see _judge).
MAX_FAST_VERDICTS: Final = 64
# Unnamed Parses a session remembers byte for byte (known_parse): an app's hot
# statements; small ones only (the bytes are held, once per session).
MAX_KNOWN_PARSES: Final = 16
MAX_KNOWN_PARSE_BYTES: Final = 2048
# Named statements whose Binds a session checks by their tenant parameters' bytes.
MAX_BIND_LANES: Final = 64


def _asyncpg_reset_queries() -> frozenset[str]:
    """The exact texts asyncpg's Connection.reset()/Pool release sends (0.30+).

    Each part only touches the session's own state: advisory locks and LISTEN
    are refused by the policy anyway, there are no WITH HOLD cursors to close,
    and RESET ALL returns settings to the values of the proxy-built startup
    packet (the lexing pins and the tenant's statement_timeout included).
    Refusing them would make every asyncpg pool discard its connections.
    """
    parts = ("SELECT pg_advisory_unlock_all();", "CLOSE ALL;", "UNLISTEN *;", "RESET ALL;")
    texts = set()
    for mask in range(1, 1 << len(parts)):
        texts.add("\n".join(p for i, p in enumerate(parts) if mask & (1 << i)))
    return frozenset(texts)


DRIVER_RESET_QUERIES: Final = _asyncpg_reset_queries()


@dataclass(frozen=True, slots=True)
class _Rest:
    """The unanalysed remainder of a refused string, as one statement for injection."""

    location: int
    length: int = 0
    transaction: str | None = None
    command: str = "other"
    tag: str = ""


def _command(statements: Sequence[StatementShape]) -> str:
    """The metric label of a string: its first statement that is not transaction control."""
    for statement in statements:
        if statement.transaction is None:
            return statement.command
    return "other"


_NO_STATEMENTS: Final = Analysis((), None)


def analysis_policy(policy: Policy) -> AnalysisPolicy:
    return AnalysisPolicy(
        scoped_tables=dict(policy.tables),
        shared_tables=frozenset(policy.shared_tables),
        unknown_tables=policy.unknown_tables,
        check_predicates=policy.enforces_predicates,
        tenant_setting=policy.tenant_setting,
        allowed_functions=frozenset(f.lower() for f in policy.allowed_functions),
        denied_functions=frozenset(f.lower() for f in policy.denied_functions),
    )


class Prepared:
    """A client's Parse the proxy allowed, as the server may hold it.

    Plain classes here and in :class:`_Slot`, not dataclasses: mypyc compiles
    an explicit ``__init__`` but not a dataclass's generated one, and libpq's
    unnamed statements make one of each per statement.
    """

    __slots__ = ("_tenant_params", "analysis", "described", "info", "parse", "payload", "refusal")

    def __init__(
        self,
        parse: Parse,
        analysis: Analysis,
        info: PortalInfo = UNKNOWN_PORTAL,
        described: tuple[int, ...] = (),
        refusal: Rejection | None = None,
    ) -> None:
        self.parse = parse
        self.analysis = analysis
        # What a portal bound to this statement is (computed once, not per Bind).
        self.info = info
        # Parameter types the server reported (ParameterDescription) for this statement.
        self.described = described
        # Why every Bind of it is refused: a statement prepared under an earlier
        # policy that this one refuses (PolicyInspector.inherit).
        self.refusal = refusal
        # The Parse's payload, once remembered for known_parse (an unnamed statement).
        self.payload: bytes | None = None
        self._tenant_params: tuple[int, ...] | None = None

    def tenant_params(self) -> tuple[int, ...]:
        """The numbers ($n) of the parameters that must be the tenant, ascending
        (worked out at the first Bind: a prepared statement is bound many times)."""
        numbers = self._tenant_params
        if numbers is None:
            found = {n for statement in self.analysis.statements for n in statement.tenant_params}
            numbers = self._tenant_params = tuple(sorted(found))
        return numbers

    def param_type(self, index: int) -> int:
        declared = self.parse.param_types[index] if index < len(self.parse.param_types) else 0
        if declared == 0 and index < len(self.described):
            return self.described[index]
        return declared


class _Slot:
    """A statement name: the Parse the server confirmed, and those it has yet to answer."""

    __slots__ = ("confirmed", "pending")

    def __init__(self) -> None:
        self.confirmed: Prepared | None = None
        self.pending: list[Prepared] = []

    def candidates(self, unnamed: bool) -> list[Prepared]:
        """What a Bind of this name may run.

        The unnamed statement is dropped by every Parse (even one that fails)
        and by every simple Query, so only the latest can run.  A named one
        keeps its old text if a new Parse fails (duplicate name), so until the
        server answers, a Bind must satisfy every candidate.
        """
        if unnamed:
            if self.pending:
                return [self.pending[-1]]
            return [self.confirmed] if self.confirmed else []
        return ([self.confirmed] if self.confirmed else []) + self.pending


class _BindLane:
    """What a Bind of one named statement needs checked while the registry is as it
    was (``version``): its tenant parameters ($n) are this tenant's bytes in text
    format (see known_bind)."""

    __slots__ = ("info", "numbers", "version")

    def __init__(self, version: int, info: PortalInfo, numbers: tuple[int, ...]) -> None:
        self.version = version
        self.info = info
        self.numbers = numbers


# Called with (rule, analysis or None, sql) for every refusal or would-be refusal.
RejectionListener = Callable[[Rejection, str, bool], None]


class PolicyInspector:
    """One session's enforcement state; implements :class:`tenantgate.hooks.Inspector`."""

    def __init__(
        self,
        cache: AnalysisCache,
        tenant: str,
        statement_timeout_limit_ms: int | None,
        dry_run: bool,
        on_rejection: RejectionListener | None = None,
        idle_in_transaction_limit_ms: int | None = None,
    ) -> None:
        self._idle_limit = idle_in_transaction_limit_ms
        # Whether the Query/Parse just inspected would have been refused (dry run).
        self.last_would_reject = False
        self._cache = cache
        self._tenant = tenant
        self._timeout_limit = statement_timeout_limit_ms
        self._dry_run = dry_run
        self._on_rejection = on_rejection
        self._statements: dict[str, _Slot] = {}
        # Bumped by every change to _statements or a slot in it: a _BindLane of an
        # older version is ignored (known_bind).
        self._version = 0
        self._bind_lanes: dict[bytes, _BindLane] = {}
        # The session's steady-state lane (attach_lane): taught the _BindLanes it may
        # apply itself, made to forget them at every version.
        self._lane: Lane | None = None
        self._tenant_bytes = tenant.encode()
        self._portals: dict[str, PortalInfo] = {}
        self._infos: dict[str, tuple[Analysis, PortalInfo]] = {}
        self.last_analysis: Analysis | None = None
        self.rejections = 0
        self._known = cache.known_messages
        self._controls = cache.known_controls
        self._tenant_only = frozenset((tenant,))
        # Where the session's lane files the texts it allows by their shape (_teach_shape).
        self._file_shaped = cache.file_shaped
        self._tenant_literal = b"'" + self._tenant_bytes + b"'"
        # _judge's answers: id -> (the analysis, held so its id stays unique, answer).
        self._judged: dict[int, tuple[Analysis, Rejection | None, str | None]] = {}
        # Unnamed Parses allowed, for known_parse: payload -> what it made.
        self._known_parses: dict[bytes, Prepared] = {}

    # --- verdicts ------------------------------------------------------------------

    def _verdict(self, sql: str) -> tuple[Analysis, Rejection | None]:
        analysis = self._cache.get_or_analyse(sql)
        self.last_analysis = analysis
        rejection, _ = self._judge(analysis)
        self.last_would_reject = rejection is not None and self._dry_run
        return analysis, rejection

    def _judge(self, analysis: Analysis) -> tuple[Rejection | None, str | None]:
        """This session's verdict on ``analysis`` and, if the fast path may allow it
        (allowed, nothing left to check: see _rememberable), its metric label.

        Kept by identity: a cached text hands out the same analysis object (a text
        shape one per tenant values, so W4-like traffic asks about the same few
        objects again and again), and the answer depends on nothing else.
        """
        known = self._judged.get(id(analysis))
        if known is not None and known[0] is analysis:
            return known[1], known[2]
        rejection = analysis.rejection or check_tenant(analysis, self._tenant)
        if rejection is None:
            rejection = self._check_timeouts(analysis)
        fast = rejection is None and _rememberable(analysis)
        command = _command(analysis.statements) if fast else None
        if len(self._judged) >= MAX_FAST_VERDICTS:
            self._judged.clear()
        self._judged[id(analysis)] = (analysis, rejection, command)
        return rejection, command

    def _check_timeouts(self, analysis: Analysis) -> Rejection | None:
        """The tenant's timeouts are upstream session defaults: lowering is fine, raising not."""
        for statement in analysis.statements:
            for rule, setting, value, limit in (
                (
                    "statement_timeout_limit",
                    "statement_timeout",
                    statement.statement_timeout_ms,
                    self._timeout_limit,
                ),
                (
                    "idle_in_transaction_timeout_limit",
                    "idle_in_transaction_session_timeout",
                    statement.idle_in_transaction_timeout_ms,
                    self._idle_limit,
                ),
            ):
                if value is not None and limit is not None and (value == 0 or value > limit):
                    return Rejection(
                        rule,
                        f"{setting} may not exceed this tenant's limit of {limit} ms",
                        f"use a value between 1 and {limit} ms",
                    )
        return None

    def _refuse(self, rejection: Rejection, sql: str) -> PgError | None:
        if self._on_rejection is not None:
            self._on_rejection(rejection, sql, self._dry_run)
        self.rejections += 1
        if self._dry_run:
            log.warning("dry run: would reject (%s): %s", rejection.rule, rejection.message)
            return None
        return rejected(rejection.rule, rejection.message, rejection.hint)

    # --- Inspector protocol ----------------------------------------------------------

    def inspect_query(self, sql: str) -> PgError | None:
        if sql in DRIVER_RESET_QUERIES:
            self.last_analysis = _NO_STATEMENTS  # no table access: nothing to inject
            return None
        _, rejection = self._verdict(sql)
        return None if rejection is None else self._refuse(rejection, sql)

    def inspect_parse(self, parse: Parse) -> PgError | None:
        analysis, rejection = self._verdict(parse.query)
        if rejection is not None:
            error = self._refuse(rejection, parse.query)
            if error is not None:
                if parse.name == "":
                    # The failing Parse still drops the server's unnamed statement.
                    self._changed()
                    self._statements.pop("", None)
                return error
        info = self._portal_info_of(parse.query, analysis)
        self._pend(Prepared(parse, analysis, info))
        return None

    def _pend(self, prepared: Prepared) -> None:
        self._changed()
        slot = self._statements.setdefault(prepared.parse.name, _Slot())
        slot.pending.append(prepared)

    def known_parse(self, payload: bytes) -> Parse | None:
        prepared = self._known_parses.get(payload)
        if prepared is None:
            return None
        # What inspect_parse does for an allowed Parse.  Its verdict is a function
        # of the text and parameter types (the bytes compared) and of this inspector's
        # policy, which a reload replaces along with the inspector.  The Prepared is
        # shared: nothing mutates one (statement_described makes a new one), and it
        # keeps its tenant parameters, worked out once.
        self.last_analysis = prepared.analysis
        self.last_would_reject = False
        self._cache.hits += 1
        self._pend(prepared)
        return prepared.parse

    def remember_parse(self, payload: bytes, parse: Parse) -> None:
        if parse.name or self.last_would_reject or len(payload) > MAX_KNOWN_PARSE_BYTES:
            return  # named statements are parsed once; a dry-run refusal is counted each time
        slot = self._statements.get("")
        if slot is not None and slot.pending and slot.pending[-1].parse is parse:
            known = self._known_parses
            if len(known) >= MAX_KNOWN_PARSES:
                known.clear()
            prepared = known[payload] = slot.pending[-1]
            prepared.payload = payload

    def _portal_info_of(self, sql: str, analysis: Analysis) -> PortalInfo:
        """What a portal of this statement is; built once per text and analysis."""
        cached = self._infos.get(sql)
        if cached is not None and cached[0] is analysis:
            return cached[1]
        statements = analysis.statements
        info = PortalInfo(
            bool(statements) and statements[0].transaction is not None,
            _command(statements),
            sql,
            analysis.rejection is not None,
            any(s.tag == "DEALLOCATE ALL" for s in statements),
        )
        if len(self._infos) >= MAX_PORTAL_INFOS:
            self._infos.clear()
        self._infos[sql] = (analysis, info)
        return info

    def inspect_bind(self, bind: Bind) -> PgError | None:
        slot = self._statements.get(bind.statement)
        if slot is None:
            return None  # unknown to the server too: it answers "does not exist"
        candidates = slot.candidates(unnamed=bind.statement == "")
        would_reject = False
        for prepared in candidates:
            rejection = self._check_params(prepared, bind)
            if rejection is not None:
                error = self._refuse(rejection, prepared.parse.query)
                if error is not None:
                    self._portals.pop(bind.portal, None)
                    return error
                would_reject = True
        if not candidates:
            self._record_portal(bind.portal, UNKNOWN_PORTAL)
            return None
        info = candidates[-1].info
        if (would_reject or any(p.info.would_reject for p in candidates)) and not info.would_reject:
            info = replace(info, would_reject=True)
        self._record_portal(bind.portal, info)
        return None

    def known_bind(self, payload: bytes) -> PortalInfo | None:
        """:meth:`inspect_bind` of a Bind payload to the unnamed portal, read in place,
        when it allows the Bind outright; None: not that case, go the general way.

        That case: the statement name has one candidate text (an unnamed
        statement's latest Parse, or a named one the server confirmed with no
        Parse of the name pending), every tenant parameter matches, and nothing
        about it is a dry-run would-be refusal.  The registry is looked up at
        every Bind, so whatever changes a statement (Parse, Close, a failed
        Parse, a simple Query, a reload's new inspector) applies at once.
        """
        if not payload or payload[0] != 0:
            return None  # a named portal
        name_end = payload.find(0, 1)
        if name_end < 0:
            return None
        key = payload[1:name_end]
        lane = self._bind_lanes.get(key)
        if lane is not None and lane.version == self._version:
            values = bind_params_at(payload, name_end + 1, lane.numbers)
            if values is not None and _all_text(values, self._tenant_bytes):
                self._teach(key, lane)
                return self._record_portal("", lane.info)
        try:
            name = payload[1:name_end].decode("utf-8")
        except UnicodeDecodeError:
            return None
        if name and is_internal_name(name):
            return None  # the general path refuses reserved names
        slot = self._statements.get(name)
        if slot is None:
            return None
        if name:
            prepared = None if slot.pending else slot.confirmed
        else:
            prepared = slot.pending[-1] if slot.pending else slot.confirmed
        if prepared is None or prepared.info.would_reject or prepared.refusal is not None:
            return None
        numbers = prepared.tenant_params()
        values = bind_params_at(payload, name_end + 1, numbers)
        if values is None:
            return None
        tenant = self._tenant
        as_bytes = bool(name)  # a named statement's next Binds may take the lane
        for index, (value, binary) in enumerate(values):
            type_oid = prepared.param_type(numbers[index] - 1)
            if not tenant_param_matches(value, binary, type_oid, tenant):
                return None
            as_bytes = as_bytes and matches_as_bytes(binary, type_oid)
        if as_bytes:
            if len(self._bind_lanes) >= MAX_BIND_LANES:
                self._bind_lanes.clear()
            lane = self._bind_lanes[key] = _BindLane(self._version, prepared.info, numbers)
            self._teach(key, lane)
        return self._record_portal("", prepared.info)

    def inherit(self, previous: Inspector) -> None:
        """Take over the prepared statements and portals ``previous`` (the inspector a
        reload replaces) knew of, each statement judged again under this policy.

        The server keeps a session's prepared statements across a reload, so a
        Bind of one must still be checked: without this, the new inspector would
        not know the name and let any Bind of it through.  A statement this
        policy refuses refuses every Bind of it (its ``refusal``).
        """
        if not isinstance(previous, PolicyInspector):
            return
        last = self.last_analysis, self.last_would_reject
        for name, slot in previous._statements.items():
            carried = _Slot()
            if slot.confirmed is not None:
                carried.confirmed = self._judged_again(slot.confirmed)
            carried.pending = [self._judged_again(prepared) for prepared in slot.pending]
            self._statements[name] = carried
        self._portals.update(previous._portals)
        self.last_analysis, self.last_would_reject = last
        self._changed()

    def _judged_again(self, prepared: Prepared) -> Prepared:
        query = prepared.parse.query
        analysis, rejection = self._verdict(query)
        return Prepared(
            prepared.parse,
            analysis,
            self._portal_info_of(query, analysis),
            prepared.described,
            rejection,
        )

    def attach_lane(self, lane: Lane) -> bool:
        self._lane = lane
        lane.attach(self._portals, MAX_TRACKED_PORTALS, self._known_parses, self.lane_parsed)
        return True

    def lane_parsed(self, prepared: Prepared) -> None:
        """The session's lane had the server answer a Parse of the unnamed statement
        that known_parse knows as ``prepared``, and a Bind of it: what known_parse
        and then parse_resolved record for them (the lane sends such a request only
        when nothing is outstanding, so no Parse is pending)."""
        self._changed()
        self._statements.setdefault("", _Slot()).confirmed = prepared

    def _teach(self, key: bytes, bind_lane: _BindLane) -> None:
        """Let the session's lane apply ``bind_lane`` (valid at this version) itself."""
        if self._lane is not None:
            info = bind_lane.info
            self._lane.learn(
                key, bind_lane.numbers, info, info.command, info.plain, info.transaction_control
            )

    def _teach_parse(self, prepared: Prepared) -> None:
        """The server now holds ``prepared`` as its unnamed statement, with no Parse
        pending: the lane may take its known Parse and a Bind of it when known_parse
        and known_bind would answer for them by their bytes, now and whenever the
        Parse comes again while known_parse still knows it as ``prepared`` (the
        lane keeps up to 16 such Parses, and confirms the one it takes as the
        unnamed statement: lane_parsed)."""
        if self._lane is None:
            return
        payload = prepared.payload
        if (
            payload is None
            or prepared.parse.name
            or self._known_parses.get(payload) is not prepared
            or prepared.info.would_reject
            or prepared.refusal is not None
        ):
            return
        numbers = prepared.tenant_params()
        for number in numbers:
            if not matches_as_bytes(False, prepared.param_type(number - 1)):
                return  # not a test of the bytes alone: known_bind decides each Bind
        info = prepared.info
        self._lane.learn_parse(
            payload,
            numbers,
            info,
            info.command,
            self._cache,
            info.plain,
            info.transaction_control,
            prepared,
        )

    def _changed(self) -> None:
        """The statement registry changed: every _BindLane is out of date."""
        self._version += 1
        if self._lane is not None:
            self._lane.forget()

    def _record_portal(self, portal: str, info: PortalInfo) -> PortalInfo:
        """Record what a bound portal now is (the map bounded: see MAX_TRACKED_PORTALS)."""
        if len(self._portals) > MAX_TRACKED_PORTALS:
            self._portals.clear()
        self._portals[portal] = info
        return info

    def _check_params(self, prepared: Prepared, bind: Bind) -> Rejection | None:
        if prepared.refusal is not None:
            return prepared.refusal
        params = bind.params
        for number in prepared.tenant_params():
            index = number - 1
            value = params[index] if index < len(params) else None
            type_oid = prepared.param_type(index)
            if not tenant_param_matches(value, bind.param_is_binary(index), type_oid, self._tenant):
                return Rejection(
                    "wrong_tenant_param",
                    f"parameter ${number} must be this session's tenant id",
                    f"bind ${number} to the tenant id you logged in as",
                )
        return None

    def parse_resolved(self, parse: Parse, ok: bool) -> None:
        self._changed()
        slot = self._statements.get(parse.name)
        if slot is None:
            return
        for index, prepared in enumerate(slot.pending):
            if prepared.parse is parse:
                del slot.pending[index]
                if ok:
                    slot.confirmed = prepared
                break
        if slot.confirmed is None and not slot.pending:
            del self._statements[parse.name]
        elif self._lane is not None and not slot.pending and slot.confirmed is not None:
            self._teach_parse(slot.confirmed)

    def statement_described(self, name: str, type_oids: tuple[int, ...]) -> None:
        # Responses arrive in order, so the statement described is the confirmed one.
        self._changed()
        slot = self._statements.get(name)
        old = None if slot is None else slot.confirmed
        if slot is not None and old is not None:
            slot.confirmed = Prepared(old.parse, old.analysis, old.info, type_oids, old.refusal)

    def close_resolved(self, name: str, ok: bool) -> None:
        self._changed()
        slot = self._statements.get(name)
        if slot is not None and ok:
            slot.confirmed = None
            if not slot.pending:
                del self._statements[name]

    def last_statements(self) -> Sequence[StatementShape]:
        analysis = self.last_analysis
        if analysis is None:
            return ()
        if analysis.rejection is not None:
            # Dry run forwards refused strings; their analysis stops before the refused
            # statement, so let the tenant be injected before it and what follows.
            done = analysis.statements
            end = done[-1].location + done[-1].length if done else 0
            return (*done, _Rest(end))
        return analysis.statements

    def portal_info(self, portal: str) -> PortalInfo:
        return self._portals.get(portal, UNKNOWN_PORTAL)

    def last_command(self) -> str:
        return _command(self.last_statements())

    def known_query(self, message: bytes) -> KnownQuery | None:
        found = self._known.get(message)
        if found is None:
            return self._unparsed_query(message)
        sql, analysis, command, constants = found
        if constants and constants != self._tenant_only:
            return None  # another tenant's constant: the general path refuses it
        self.last_analysis = analysis
        self.last_would_reject = False
        self.query_sent()
        self._cache.hits += 1
        if self._lane is not None:
            # Until the registry changes again, query_sent would change nothing: the
            # lane may allow the known messages itself (in rls/both mode only the
            # transaction control among them).
            self._lane.learn_queries(self._known, self._controls, self._tenant_only, self._cache)
        return KnownQuery(sql, command)

    def _unparsed_query(self, message: bytes) -> KnownQuery | None:
        """A whole Query (one message, the bytes given) whose text the analysis cache
        answers without a parse: its text, or a new text of a known text shape (W4's
        inlined literals).  The general path's verdict without its framing and
        dispatch; None whenever that path has more to do (refusals, dry run,
        timeout settings, DEALLOCATE ALL, driver resets, anything to analyse).
        """
        end = len(message) - 1
        if end < 5 or message[end] != 0 or message.find(0, 5) != end:
            return None
        if int.from_bytes(message[1:5], "big") != end:
            return None
        encoded = message[5:end]
        try:
            sql = encoded.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if sql in DRIVER_RESET_QUERIES:
            return None
        found = self._cache.without_parse(sql, encoded)
        if found is None:
            return None
        analysis, cached = found
        command = self._fast_command(analysis)
        if command is None:
            return None  # counted by the general path's lookup, once
        self._cache.take(sql, analysis, cached)
        self.last_analysis = analysis
        self.last_would_reject = False
        self.query_sent()
        if cached:  # its second sight (checked above: allowed, rememberable)
            self._remember(message, sql, analysis, command)
        elif self._lane is not None:
            self._teach_shape(self._lane, encoded, analysis, command)
        return KnownQuery(sql, command)

    def _teach_shape(self, lane: Lane, encoded: bytes, analysis: Analysis, command: str) -> None:
        """A text the cache answered by its text shape was just allowed as is: until the
        registry changes again (query_sent would change nothing), the lane may allow
        the texts of its digit key that pass the shape's checks (the same text key,
        the same tenant literals: the same analysis, so the same verdict) itself.

        Only texts whose tenant literals are all this tenant's string literal.  The
        routes are the cache's, shared by this tenant's sessions: the verdict on a
        plain SELECT/INSERT/UPDATE/DELETE whose tenant constants are the tenant's
        depends on the policy (the cache's) and the tenant only (_judge; the
        tenant's timeout limits apply to SET statements only).
        """
        routes = self._cache.lane_routes
        digits = digits_of(encoded)
        key = self._tenant_literal + digits
        if key not in routes:
            checks = self._cache.text_shapes.lane_program(encoded, digits, self._tenant_literal)
            if checks is None:
                return
            if len(routes) >= self._cache.maxsize:
                routes.clear()
            routes[key] = (checks, command, analysis)
        lane.learn_shapes(routes, self._file_shaped)

    def _fast_command(self, analysis: Analysis) -> str | None:
        """The metric label of an analysis the fast path may allow for this session, or
        None (see _judge)."""
        return self._judge(analysis)[1]

    def remember_query(self, message: bytes) -> None:
        analysis = self.last_analysis
        if analysis is None or analysis is _NO_STATEMENTS or self.last_would_reject:
            return
        if not self._cache.last_hit:
            return  # seen once: texts that never repeat (inlined literals) stay out
        command = self._fast_command(analysis)
        if command is None:
            return
        self._remember(message, message[5:-1].decode("utf-8"), analysis, command)

    def _remember(self, message: bytes, sql: str, analysis: Analysis, command: str) -> None:
        """Record a Query :meth:`_fast_command` allowed, for :meth:`known_query`."""
        constants = frozenset().union(*(s.tenant_constants for s in analysis.statements))
        known = self._known
        if len(known) >= self._cache.maxsize:
            known.clear()
            self._controls.clear()
        entry = known[message] = (sql, analysis, command, constants)
        statements = analysis.statements
        if len(statements) == 1 and statements[0].transaction is not None:
            self._controls[message] = entry

    def query_sent(self) -> None:
        # A simple Query destroys the unnamed prepared statement.
        slot = self._statements.get("")
        if slot is not None and slot.confirmed is not None:
            self._changed()
            slot.confirmed = None


def _all_text(values: list[tuple[bytes | None, bool]], tenant: bytes) -> bool:
    """Every value is ``tenant``'s bytes in text format (a _BindLane's check)."""
    for value, binary in values:  # noqa: SIM110 (a loop compiles to C; all() of a generator does not)
        if binary or value != tenant:
            return False
    return True


def _rememberable(analysis: Analysis) -> bool:
    """Whether a fast path may answer for this text: no timeout setting (checked against
    the tenant's limits) and no DEALLOCATE ALL (resets injection)."""
    return not any(
        statement.statement_timeout_ms is not None
        or statement.idle_in_transaction_timeout_ms is not None
        or statement.tag == "DEALLOCATE ALL"
        for statement in analysis.statements
    )
