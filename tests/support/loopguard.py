"""Fail tests on unhandled asyncio event-loop exceptions (like asyncpg's test base).

Every loop made through :class:`GuardedEventLoopPolicy` reports anything that
reaches ``loop.call_exception_handler`` (a task's exception never retrieved, a
failing callback, errors while cancelling leftover tasks) to a :class:`LoopGuard`
as well as to whatever handler the code under test installed.  The conftest
hooks check the guard after each test's teardown and fail the test.

pytest-asyncio creates its loops through the current policy, so installing the
policy in ``pytest_configure`` covers every async test and fixture.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import traceback
from typing import Any


def format_context(context: dict[str, Any]) -> str:
    message = str(context.get("message") or "unhandled exception in event loop")
    parts = [message]
    for key, value in context.items():
        if key not in ("message", "exception"):
            parts.append(f"  {key}: {value!r}")
    exc = context.get("exception")
    if isinstance(exc, BaseException):
        parts.append("".join(traceback.format_exception(exc)).rstrip())
    return "\n".join(parts)


class LoopGuard:
    """Collects event-loop exception contexts until :meth:`take` is called."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: list[str] = []
        self.loops_created = 0

    def record(self, context: dict[str, Any]) -> None:
        with self._lock:
            self._errors.append(format_context(context))

    def take(self, collect: bool) -> list[str]:
        """Errors so far (after a GC pass if ``collect``, so dead tasks report)."""
        if collect:
            gc.collect()
        with self._lock:
            errors, self._errors = self._errors, []
        return errors


class GuardedEventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """The default policy, with every new loop's exception handling observed."""

    def __init__(self, guard: LoopGuard) -> None:
        super().__init__()
        self.guard = guard

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        self.guard.loops_created += 1
        original = loop.call_exception_handler
        guard = self.guard

        def call_exception_handler(context: dict[str, Any]) -> None:
            guard.record(context)
            original(context)

        # An instance attribute wins over the method for every caller (asyncio's C
        # Task included), and survives the code under test replacing the handler.
        loop.call_exception_handler = call_exception_handler  # type: ignore[method-assign]
        return loop


# The one guard of the test session (tests/conftest.py installs it).
LOOP_GUARD = LoopGuard()
