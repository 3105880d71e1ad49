"""Per-session telemetry: turns what a session did into metrics and audit events.

Owns :class:`SessionTelemetry`, the :class:`~tenantgate.hooks.SessionObserver`
that the proxy gives every session.  It binds the tenant's metric children
once per session and builds audit events only when someone will read them
(rejections always; other statements when ``audit.statements`` is on).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final

from tenantgate.audit import AuditEvent, AuditLog, event_for
from tenantgate.metrics import SessionMetrics
from tenantgate.session import SessionInfo
from tenantgate.tracker import Pending

if TYPE_CHECKING:
    from tenantgate._lane import Lane

# A C static once compiled (a plain import is a globals lookup per statement).
_perf_counter: Final = time.perf_counter


class SessionTelemetry:
    """Implements :class:`tenantgate.hooks.SessionObserver` for one session."""

    __slots__ = ("_audit", "_info", "_metrics")

    def __init__(self, info: SessionInfo, metrics: SessionMetrics, audit: AuditLog | None) -> None:
        self._info = info
        self._metrics = metrics
        self._audit = audit
        metrics.opened()

    def request_done(self, entry: Pending, ok: bool) -> None:
        if entry.rows:
            self._metrics.rows(entry.rows)
        if entry.would_reject:
            return  # dry run: its one outcome, would_reject, was counted when inspected
        duration = _perf_counter() - entry.started if entry.started else None
        outcome = "allowed" if ok else "error"
        self._metrics.statement(entry.command, outcome, duration)
        audit = self._audit
        # The attribute, not the wants_statements property: that is an interpreted call.
        if audit is not None and audit.statements and entry.sql is not None:
            audit.record(
                self._event(
                    entry.sql,
                    entry.command,
                    outcome,
                    None,
                    None if duration is None else duration * 1000.0,
                    entry.rows,
                )
            )

    def rejected(self, rule: str, sql: str, command: str, dry_run: bool) -> None:
        outcome = "would_reject" if dry_run else "rejected"
        self._metrics.statement(command, outcome, None)
        self._metrics.rejected(rule)
        if self._audit is not None:
            self._audit.record(self._event(sql, command, outcome, rule, None, None))

    def traffic(self, bytes_in: int, bytes_out: int) -> None:
        if bytes_in:
            self._metrics.bytes_in(bytes_in)
        if bytes_out:
            self._metrics.bytes_out(bytes_out)

    def rate_limited(self) -> None:
        self._metrics.rate_limited()

    def closed(self) -> None:
        self._metrics.closed()

    def attach_lane(self, lane: Lane) -> bool:
        audit = self._audit
        if audit is not None and audit.statements:
            return False  # each statement is an audit event: the Python path makes it
        self._metrics.attach_lane(lane)
        return True

    def _event(
        self,
        sql: str,
        command: str,
        verdict: str,
        rule: str | None,
        duration_ms: float | None,
        rows: int | None,
    ) -> AuditEvent:
        info = self._info
        return event_for(
            sql,
            tenant=info.tenant,
            user=info.user,
            client_addr=info.peer,
            session_id=info.session_id,
            command=command,
            verdict=verdict,
            rule=rule,
            duration_ms=duration_ms,
            rows=rows,
        )
