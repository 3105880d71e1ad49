"""Per-tenant limits that need state or arithmetic: rate limiting and statement timeouts.

Owns :class:`TokenBucket` (``queries_per_second``: a statement over the rate
waits for its reserved token, up to ``limits.rate_limit_max_delay_ms``, and is
rejected with 53400 beyond that), :class:`TenantLimiter` (one bucket per
tenant shared by all its sessions, kept across reloads), and the
``statement_timeout`` arithmetic (:func:`effective_statement_timeout`,
:func:`parse_duration_ms`).  Connection counting (53300) and the idle/handshake
timeouts live in the server and session; nothing here does I/O or sleeps.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Final

from tenantgate.config import Policy

Clock = Callable[[], float]


class TokenBucket:
    """A token bucket that hands out *reservations*.

    Tokens accrue at ``rate`` per second up to ``burst`` (default: one second's
    worth, at least 1).  :meth:`reserve` takes a token now or books the next
    one that will accrue, letting the balance go negative, so waiting callers
    are served in arrival order and the long-run rate never exceeds ``rate``.
    """

    __slots__ = ("_burst", "_clock", "_last", "_rate", "_tokens")

    def __init__(self, rate: float, burst: float | None = None, clock: Clock = time.monotonic):
        self._clock = clock
        self._rate = 0.0
        self._burst = 0.0
        self._set(rate, burst)
        self._tokens = self._burst
        self._last = clock()

    def _set(self, rate: float, burst: float | None) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("rate must be a positive number of tokens per second")
        if burst is None:
            burst = max(1.0, rate)
        if not (burst >= 1 and math.isfinite(burst)):
            raise ValueError("burst must be at least 1")
        self._rate = float(rate)
        self._burst = float(burst)

    @property
    def rate(self) -> float:
        return self._rate

    @property
    def burst(self) -> float:
        return self._burst

    @property
    def tokens(self) -> float:
        """Tokens available now (negative: reservations not yet covered)."""
        self._refill()
        return self._tokens

    def _refill(self) -> None:
        now = self._clock()
        elapsed = now - self._last
        if elapsed > 0:
            self._tokens = min(self._burst, self._tokens + elapsed * self._rate)
            self._last = now

    def reserve(self, max_delay_s: float) -> float | None:
        """Reserve one token: the seconds to wait before using it (0.0: now).

        None if the wait would exceed ``max_delay_s``; then nothing is reserved
        and the caller rejects the statement (53400).
        """
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        delay = (1.0 - self._tokens) / self._rate
        if delay > max_delay_s:
            return None
        self._tokens -= 1.0
        return delay

    def refund(self) -> None:
        """Give back a reserved token the caller did not use (e.g. the client went away)."""
        self._refill()
        self._tokens = min(self._burst, self._tokens + 1.0)

    def update(self, rate: float, burst: float | None = None) -> None:
        """Change the rate (a reload); accrued tokens and reservations are kept."""
        self._refill()
        self._set(rate, burst)
        self._tokens = min(self._tokens, self._burst)


class TenantLimiter:
    """One :class:`TokenBucket` per tenant with ``queries_per_second``, shared by its sessions."""

    def __init__(self, policy: Policy | None = None, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self.max_delay_s = 0.0
        if policy is not None:
            self.update(policy)

    def update(self, policy: Policy) -> None:
        """Adopt a (re)loaded policy: keep buckets whose tenant is still limited.

        A kept bucket keeps its state (so a reload cannot be used to reset a
        tenant's budget) and takes the new rate; tenants that lost their limit
        or were removed lose their bucket.
        """
        buckets: dict[str, TokenBucket] = {}
        for tenant_id, tenant in policy.tenants.items():
            rate = tenant.limits.queries_per_second
            if rate is None:
                continue
            bucket = self._buckets.get(tenant_id)
            if bucket is None:
                bucket = TokenBucket(rate, clock=self._clock)
            elif bucket.rate != rate:
                bucket.update(rate)
            buckets[tenant_id] = bucket
        self._buckets = buckets
        self.max_delay_s = policy.limits.rate_limit_max_delay_ms / 1000.0

    def bucket(self, tenant: str) -> TokenBucket | None:
        return self._buckets.get(tenant)

    def reserve(self, tenant: str) -> float | None:
        """Seconds ``tenant``'s next statement must wait (0.0 when unlimited); None: reject."""
        bucket = self._buckets.get(tenant)
        if bucket is None:
            return 0.0
        return bucket.reserve(self.max_delay_s)


def effective_statement_timeout(
    tenant_limit_ms: int | None, requested_ms: int | None
) -> int | None:
    """The statement timeout (ms) to enforce; None: set nothing.

    ``requested_ms`` is what the client asked for (its ``statement_timeout``;
    None if it never set one).  The client may lower the tenant's limit, never
    raise it: ``0`` ("no limit") and anything above the limit become the limit.
    Without a tenant limit the client's own value stands.
    """
    if tenant_limit_ms is None:
        if requested_ms is None or requested_ms <= 0:
            return None
        return requested_ms
    if requested_ms is None or requested_ms <= 0:
        return tenant_limit_ms
    return min(requested_ms, tenant_limit_ms)


_DURATION: Final = re.compile(r"^\s*([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)\s*([a-zA-Z]*)\s*$")
_UNIT_MS: Final = {"us": 0.001, "ms": 1.0, "s": 1000.0, "min": 60_000.0, "h": 3_600_000.0}
_UNIT_MS["d"] = 24 * _UNIT_MS["h"]
_MAX_TIMEOUT_MS: Final = 2**31 - 1


def parse_duration_ms(value: str) -> int | None:
    """A ``statement_timeout`` setting value as whole milliseconds; None if not valid.

    Accepts PostgreSQL's forms: a bare number (ms) or a number with unit
    ``us``, ``ms``, ``s``, ``min``, ``h`` or ``d`` (units are case-sensitive in
    PostgreSQL; so here), optionally quoted.  Fractions round to the nearest
    millisecond (half to even, like PostgreSQL's ``rint``), so ``0.4`` is 0:
    "no limit", which :func:`effective_statement_timeout` caps to the tenant's.
    """
    text = value.strip()
    if len(text) >= 2 and text[0] == text[-1] == "'":
        text = text[1:-1]
    match = _DURATION.match(text)
    if match is None:
        return None
    number, unit = match.groups()
    factor = _UNIT_MS.get(unit or "ms")
    if factor is None:
        return None
    ms = float(number) * factor
    if not math.isfinite(ms) or ms < 0 or ms > _MAX_TIMEOUT_MS:
        return None
    return round(ms)
