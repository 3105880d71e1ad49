"""Wiring of a running proxy: policy -> analysis cache -> inspectors -> server,
plus metrics, the audit log, rate limits, reload and shutdown.

Owns the objects that live as long as the process (the analysis cache of the
current policy, the server, the metrics registry and HTTP endpoint, the audit
writer, the per-tenant rate limiter), policy reload (validate fully, then
swap), and the signal handlers (SIGHUP reload, SIGTERM/SIGINT drain).  Kept
thin: each piece it wires has its own module.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from tenantgate.analysis import AnalysisCache, Rejection
from tenantgate.audit import AuditLog
from tenantgate.config import Policy, load_policy
from tenantgate.enforcement import PolicyInspector, analysis_policy
from tenantgate.errors import ConfigError
from tenantgate.hooks import Inspector
from tenantgate.limits import TenantLimiter
from tenantgate.metrics import Metrics
from tenantgate.metrics_http import MetricsServer, start_http
from tenantgate.server import InspectorFactory, ProxyServer
from tenantgate.session import Session, SessionInfo, command_of
from tenantgate.telemetry import SessionTelemetry

log = logging.getLogger("tenantgate")
CACHE_ENTRIES = 10000


class ProxyApp:
    """A configured proxy that can be started, reloaded and drained."""

    def __init__(
        self,
        policy: Policy,
        policy_path: Path | None = None,
        inspector_factory: InspectorFactory | None = None,
    ) -> None:
        self.policy_path = policy_path
        self.policy = policy
        self.cache = AnalysisCache(analysis_policy(policy), CACHE_ENTRIES)
        self.metrics = Metrics(policy.tenants)
        self.metrics.set_cache_source(lambda: (self.cache.hits, self.cache.misses))
        self.limiter = TenantLimiter(policy)
        self.audit: AuditLog | None = None
        self.metrics_server: MetricsServer | None = None
        # Tests of the bare protocol path may pass their own inspector; serve never does.
        self.server = ProxyServer(policy, inspector_factory or self._inspector)
        self.server.on_session_start = self._session_started
        self.server.on_session_end = self._session_ended
        self.server.on_auth_failure = self.metrics.auth_failure
        self.server.rate_limit = self.limiter.reserve
        self.metrics.set_upstream_source(self._upstream_counts)
        self._telemetry: dict[str, SessionTelemetry] = {}
        self._audit_task: asyncio.Task[None] | None = None
        self._stopped = asyncio.Event()

    # --- per session -----------------------------------------------------------------

    def _telemetry_for(self, info: SessionInfo) -> SessionTelemetry:
        telemetry = self._telemetry.get(info.session_id)
        if telemetry is None:
            telemetry = SessionTelemetry(info, self.metrics.session(info.tenant), self.audit)
            self._telemetry[info.session_id] = telemetry
        return telemetry

    def _inspector(self, policy: Policy, info: SessionInfo) -> Inspector:
        limits = policy.tenants[info.tenant].limits
        telemetry = self._telemetry_for(info)

        def rejected(rejection: Rejection, sql: str, dry_run: bool) -> None:
            telemetry.rejected(rejection.rule, sql, command_of(sql), dry_run)

        return PolicyInspector(
            self.cache,
            info.tenant,
            limits.statement_timeout_ms,
            policy.dry_run,
            rejected,
            limits.idle_in_transaction_timeout_ms,
        )

    def _session_started(self, session: Session) -> None:
        session.observer = self._telemetry_for(session.info)

    def _session_ended(self, session: Session) -> None:
        telemetry = self._telemetry.pop(session.info.session_id, None)
        if telemetry is not None:
            telemetry.closed()

    def _upstream_counts(self) -> dict[str, int]:
        sessions = list(self.server.sessions.values())
        active = sum(1 for s in sessions if s.busy)
        return {"active": active, "idle": len(sessions) - active}

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        for user in self.policy.plaintext_users():
            log.warning(
                "user %r has a plaintext password in the policy; use `tenantgate hash-password`",
                user,
            )
        if self.policy.dry_run:
            log.warning("DRY RUN: statements that violate the policy are logged and FORWARDED")
        audit = self.policy.audit
        self.audit = AuditLog(
            audit.output, audit.queue_size, audit.statements, self.metrics.audit_dropped
        )
        self._audit_task = asyncio.create_task(self.audit.run(), name="tenantgate-audit")
        await self.server.start()
        if self.policy.metrics.enabled:
            self.metrics_server = await start_http(
                self.policy.metrics.host, self.policy.metrics.port, self.metrics, self._ready
            )
            log.info("metrics on http://%s:%d/metrics", self.policy.metrics.host, self.metrics_port)

    async def _ready(self) -> bool:
        return self.server.accepting and await self.server.upstream_reachable()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server is not None else None

    def reload(self) -> bool:
        """Re-read the policy file; swap only if the whole file is valid."""
        if self.policy_path is None:
            return False
        try:
            policy = load_policy(self.policy_path)
        except ConfigError as exc:
            self.metrics.config_reload("failure")
            log.error("reload failed, keeping the current policy: %s", exc)
            return False
        self.apply_policy(policy)
        log.info("policy reloaded from %s", self.policy_path)
        return True

    def apply_policy(self, policy: Policy) -> None:
        """Swap to an already validated policy (what a good reload does)."""
        self.policy = policy
        self.cache = AnalysisCache(analysis_policy(policy), CACHE_ENTRIES)
        self.metrics.set_tenants(policy.tenants)
        self.limiter.update(policy)
        if self.audit is not None:
            self.audit.statements = policy.audit.statements
            self.audit.reopen()
        self.server.swap_policy(policy)
        self.metrics.config_reload("success")

    async def drain(self) -> None:
        await self.server.shutdown(self.policy.limits.shutdown_timeout_s)
        if self.metrics_server is not None:
            await self.metrics_server.close()
        if self.audit is not None:
            await self.audit.close()
        if self._audit_task is not None:
            await asyncio.gather(self._audit_task, return_exceptions=True)
        self._stopped.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(self.drain()))

    async def wait_stopped(self) -> None:
        await self._stopped.wait()


async def serve(policy_path: Path) -> int:
    policy = load_policy(policy_path)
    app = ProxyApp(policy, policy_path)
    await app.start()
    app.install_signal_handlers()
    await app.wait_stopped()
    log.info("stopped")
    return 0
