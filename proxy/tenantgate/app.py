"""Wiring of a running proxy: policy -> analysis cache -> inspectors -> server.

Owns the objects that live as long as the process (the analysis cache of the
current policy, the server), policy reload (validate fully, then swap), and
the signal handlers (SIGHUP reload, SIGTERM/SIGINT drain).  Kept thin: each
piece it wires has its own module.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from tenantgate.analysis import AnalysisCache
from tenantgate.config import Policy, load_policy
from tenantgate.enforcement import PolicyInspector, analysis_policy
from tenantgate.errors import ConfigError
from tenantgate.hooks import Inspector
from tenantgate.server import InspectorFactory, ProxyServer
from tenantgate.session import SessionInfo

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
        # Tests of the bare protocol path may pass their own inspector; serve never does.
        self.server = ProxyServer(policy, inspector_factory or self._inspector)
        self.reloads = {"success": 0, "failure": 0}
        self._stopped = asyncio.Event()

    def _inspector(self, policy: Policy, info: SessionInfo) -> Inspector:
        limits = policy.tenants[info.tenant].limits
        return PolicyInspector(self.cache, info.tenant, limits.statement_timeout_ms, policy.dry_run)

    async def start(self) -> None:
        for user in self.policy.plaintext_users():
            log.warning(
                "user %r has a plaintext password in the policy; use `tenantgate hash-password`",
                user,
            )
        if self.policy.dry_run:
            log.warning("DRY RUN: statements that violate the policy are logged and FORWARDED")
        await self.server.start()

    @property
    def port(self) -> int:
        return self.server.port

    def reload(self) -> bool:
        """Re-read the policy file; swap only if the whole file is valid."""
        if self.policy_path is None:
            return False
        try:
            policy = load_policy(self.policy_path)
        except ConfigError as exc:
            self.reloads["failure"] += 1
            log.error("reload failed, keeping the current policy: %s", exc)
            return False
        self.policy = policy
        self.cache = AnalysisCache(analysis_policy(policy), CACHE_ENTRIES)
        self.server.swap_policy(policy)
        self.reloads["success"] += 1
        log.info("policy reloaded from %s", self.policy_path)
        return True

    async def drain(self) -> None:
        await self.server.shutdown(self.policy.limits.shutdown_timeout_s)
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
