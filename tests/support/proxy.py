"""A tenantgate proxy running in-process, on its own event loop in a thread.

A thread (not the test's loop) so that blocking drivers (psycopg sync, pg8000,
psql in a subprocess) and asyncio drivers can all talk to it.  The loop is
created through the guarded policy, so an unhandled exception inside the proxy
fails the test.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from tenantgate.app import ProxyApp
from tenantgate.config import Policy
from tenantgate.server import InspectorFactory

T = TypeVar("T")


class LoopThread:
    """An asyncio event loop running forever in a daemon thread; :meth:`call` runs on it."""

    def __init__(self, name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def call(self, fn: Callable[[], Any], timeout: float = 30) -> Any:
        """Run a coroutine function (or plain function) on the loop and wait."""

        async def runner() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                return await result
            return result

        future: Future[Any] = asyncio.run_coroutine_threadsafe(runner(), self._loop)
        return future.result(timeout)

    def shut_down(self, last: Callable[[], Any], timeout: float) -> None:
        """Run ``last`` on the loop (once), then stop the loop and join the thread."""
        if not self._thread.is_alive():
            return
        try:
            self.call(last, timeout=timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)


class RunningProxy(LoopThread):
    def __init__(self, policy: Policy, inspector_factory: InspectorFactory | None = None) -> None:
        self.policy = policy
        self.app = ProxyApp(policy, inspector_factory=inspector_factory)
        super().__init__("tenantgate-proxy")
        self.call(self.app.start)
        self.port = self.app.port
        self.host = policy.listen.host

    def dsn(self, user: str, password: str, **extra: str) -> str:
        params = " ".join(f"{k}={v}" for k, v in extra.items())
        return (
            f"host={self.host} port={self.port} dbname={self.policy.upstream.database} "
            f"user={user} password={password} sslmode=disable {params}"
        ).strip()

    def url(self, user: str, password: str) -> str:
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{self.policy.upstream.database}"

    def stop(self) -> None:
        self.shut_down(self.app.drain, timeout=60)

    def __enter__(self) -> RunningProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
