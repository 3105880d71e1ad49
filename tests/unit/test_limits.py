"""limits: token bucket math on a fake clock, per-tenant buckets across reloads, timeouts."""

from __future__ import annotations

import pytest

from tenantgate.config import Policy, parse_policy
from tenantgate.limits import (
    TenantLimiter,
    TokenBucket,
    effective_statement_timeout,
    parse_duration_ms,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def policy(
    acme_qps: float | None = 10, globex_qps: float | None = None, delay_ms: int = 250
) -> Policy:
    def limits(qps: float | None) -> str:
        return "" if qps is None else f", limits: {{queries_per_second: {qps}}}"

    return parse_policy(
        f"""
upstream: {{database: app, user: app_tenant}}
limits: {{rate_limit_max_delay_ms: {delay_ms}}}
tenants:
  acme: {{users: {{acme_app: {{password: pw}}}}{limits(acme_qps)}}}
  globex: {{users: {{globex_app: {{password: pw}}}}{limits(globex_qps)}}}
"""
    )


# --- TokenBucket ---------------------------------------------------------------------------


def test_burst_then_delays_then_reject() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, clock=clock)
    assert bucket.burst == 10
    assert [bucket.reserve(0.25) for _ in range(10)] == [0.0] * 10
    assert bucket.reserve(0.25) == pytest.approx(0.1)
    assert bucket.reserve(0.25) == pytest.approx(0.2)
    before = bucket.tokens
    assert bucket.reserve(0.25) is None  # would need 0.3 s
    assert bucket.tokens == before  # a rejection reserves nothing
    assert bucket.reserve(0.3) == pytest.approx(0.3)


def test_refill_is_capped_at_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2, burst=3, clock=clock)
    for _ in range(3):
        assert bucket.reserve(0) == 0.0
    assert bucket.reserve(0) is None
    clock.advance(0.5)
    assert bucket.reserve(0) == 0.0
    assert bucket.reserve(0) is None
    clock.advance(3600)
    assert bucket.tokens == 3
    assert [bucket.reserve(0) for _ in range(4)] == [0.0, 0.0, 0.0, None]


def test_reservations_queue_in_order_and_hold_the_rate() -> None:
    clock = FakeClock()
    rate = 50.0
    bucket = TokenBucket(rate, burst=1, clock=clock)
    start = clock.now
    ran = 0
    # 1000 statements arriving as fast as possible, each sleeping its delay.
    for _ in range(1000):
        delay = bucket.reserve(1.0)
        assert delay is not None
        clock.advance(delay)
        ran += 1
    assert ran / (clock.now - start) == pytest.approx(rate, rel=0.01)


def test_concurrent_waiters_get_increasing_delays() -> None:
    clock = FakeClock()
    bucket = TokenBucket(4, burst=1, clock=clock)
    assert bucket.reserve(1) == 0.0
    delays = [bucket.reserve(1) for _ in range(4)]
    assert delays == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert bucket.reserve(1) is None


def test_refund_returns_an_unused_token() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1, clock=clock)
    assert bucket.reserve(5) == 0.0
    assert bucket.reserve(5) == pytest.approx(1.0)
    bucket.refund()
    assert bucket.reserve(5) == pytest.approx(1.0)
    bucket.refund()
    bucket.refund()
    bucket.refund()
    assert bucket.tokens == 1  # never above burst


def test_update_keeps_state() -> None:
    clock = FakeClock()
    bucket = TokenBucket(10, clock=clock)
    for _ in range(10):
        bucket.reserve(0)
    bucket.update(100)
    assert bucket.rate == 100
    assert bucket.burst == 100
    assert bucket.tokens == pytest.approx(0)  # a reload does not refill
    clock.advance(0.05)
    assert bucket.tokens == pytest.approx(5)
    bucket.update(2)
    assert bucket.tokens == 2  # clamped to the new burst


def test_fractional_rates_have_a_burst_of_one() -> None:
    clock = FakeClock()
    bucket = TokenBucket(0.5, clock=clock)
    assert bucket.burst == 1
    assert bucket.reserve(0) == 0.0
    assert bucket.reserve(10) == pytest.approx(2.0)


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-1, None), (float("inf"), None), (1, 0.5)])
def test_invalid_buckets(rate: float, burst: float | None) -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate, burst)


def test_default_clock_is_monotonic() -> None:
    bucket = TokenBucket(1000)
    assert bucket.reserve(0) == 0.0


# --- TenantLimiter ---------------------------------------------------------------------------


def test_one_bucket_per_limited_tenant() -> None:
    clock = FakeClock()
    limiter = TenantLimiter(policy(acme_qps=10, globex_qps=None), clock=clock)
    assert limiter.max_delay_s == 0.25
    acme = limiter.bucket("acme")
    assert acme is not None
    assert acme.rate == 10
    assert limiter.bucket("acme") is acme  # shared by every session of the tenant
    assert limiter.bucket("globex") is None
    assert limiter.bucket("nobody") is None
    assert limiter.reserve("globex") == 0.0


def test_a_noisy_tenant_does_not_drain_a_quiet_one() -> None:
    clock = FakeClock()
    limiter = TenantLimiter(policy(acme_qps=10, globex_qps=10), clock=clock)
    results = [limiter.reserve("acme") for _ in range(100)]
    assert results.count(0.0) == 10
    assert results.count(None) > 80
    assert limiter.reserve("globex") == 0.0


def test_reload_keeps_buckets_and_state() -> None:
    clock = FakeClock()
    limiter = TenantLimiter(policy(acme_qps=10), clock=clock)
    acme = limiter.bucket("acme")
    for _ in range(10):
        assert limiter.reserve("acme") == 0.0
    limiter.update(policy(acme_qps=10, globex_qps=5, delay_ms=2000))
    assert limiter.bucket("acme") is acme
    assert limiter.max_delay_s == 2.0
    assert limiter.reserve("acme") == pytest.approx(0.1)  # no free refill from reloading
    limiter.update(policy(acme_qps=20, globex_qps=5))
    assert limiter.bucket("acme") is acme
    assert acme is not None
    assert acme.rate == 20
    globex = limiter.bucket("globex")
    assert globex is not None
    assert globex.rate == 5
    limiter.update(policy(acme_qps=None, globex_qps=5))
    assert limiter.bucket("acme") is None
    assert limiter.bucket("globex") is globex


def test_limiter_without_policy_limits_nothing() -> None:
    limiter = TenantLimiter()
    assert limiter.bucket("acme") is None
    assert limiter.reserve("acme") == 0.0


# --- statement timeouts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "requested", "expected"),
    [
        (None, None, None),
        (None, 0, None),
        (None, 1500, 1500),
        (5000, None, 5000),
        (5000, 0, 5000),  # "no limit" cannot escape the tenant's limit
        (5000, 1000, 1000),  # lowering is fine
        (5000, 5000, 5000),
        (5000, 60000, 5000),  # raising is not
        (5000, -1, 5000),
    ],
)
def test_effective_statement_timeout(
    tenant: int | None, requested: int | None, expected: int | None
) -> None:
    assert effective_statement_timeout(tenant, requested) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("5000", 5000),
        ("'5000'", 5000),
        ("5s", 5000),
        ("1.5s", 1500),
        ("250ms", 250),
        (" 2 min ", 120000),
        ("1h", 3600000),
        ("1d", 86400000),
        ("1500us", 2),
        ("10us", 0),
        ("0.4", 0),
        ("2.5", 2),
        ("1e3", 1000),
        ("5 seconds", None),
        ("5S", None),
        ("-1", None),
        ("abc", None),
        ("", None),
        ("1e30", None),
        ("nan", None),
    ],
)
def test_parse_duration_ms(text: str, expected: int | None) -> None:
    assert parse_duration_ms(text) == expected
