"""metrics: contract names, per-tenant series, unknown label, reload removal, sources, HTTP."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from tenantgate import metrics_http as metrics_mod
from tenantgate.metrics import DURATION_BUCKETS, Metrics
from tenantgate.metrics_http import start_http

CONTRACT = {
    "tenantgate_client_connections": "gauge",
    "tenantgate_statements": "counter",
    "tenantgate_statement_duration_seconds": "histogram",
    "tenantgate_rejections": "counter",
    "tenantgate_auth_failures": "counter",
    "tenantgate_bytes": "counter",
    "tenantgate_rows": "counter",
    "tenantgate_parse_cache_hits": "counter",
    "tenantgate_parse_cache_misses": "counter",
    "tenantgate_upstream_connections": "gauge",
    "tenantgate_config_reloads": "counter",
}
ADDITIONS = {"tenantgate_audit_dropped": "counter", "tenantgate_rate_limited": "counter"}


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def tenants_in(m: Metrics) -> set[str]:
    return {
        s.labels["tenant"]
        for family in m.registry.collect()
        for s in family.samples
        if "tenant" in s.labels
    }


def test_names_and_types_match_the_contract() -> None:
    m = Metrics(["acme"])
    families = {f.name: f.type for f in m.registry.collect()}
    assert families == CONTRACT | ADDITIONS


def test_own_registry_never_the_global_one() -> None:
    before = set(REGISTRY._names_to_collectors)
    a = Metrics(["acme"])
    b = Metrics(["acme"])  # a second instance must not collide
    assert a.registry is not b.registry
    assert set(REGISTRY._names_to_collectors) == before
    shared = CollectorRegistry()
    c = Metrics(["acme"], registry=shared)
    assert c.registry is shared


def test_two_tenants_move_independently() -> None:
    m = Metrics(["acme", "globex"])
    acme, globex = m.session("acme"), m.session("globex")
    acme.opened()
    acme.opened()
    globex.opened()
    acme.closed()
    acme.statement("select", "allowed", 0.004)
    acme.statement("select", "allowed", 0.2)
    acme.statement("insert", "rejected", None)
    acme.rejected("missing_tenant_predicate")
    globex.statement("update", "would_reject", 0.001)
    globex.rejected("missing_tenant_predicate")
    globex.rejected("statement_class")
    acme.bytes_in(100)
    acme.bytes_out(2000)
    globex.bytes_in(7)
    acme.rows(3)
    globex.rows(5)
    globex.rate_limited()

    assert value(m, "tenantgate_client_connections", tenant="acme") == 1
    assert value(m, "tenantgate_client_connections", tenant="globex") == 1
    assert (
        value(m, "tenantgate_statements_total", tenant="acme", command="select", outcome="allowed")
        == 2
    )
    assert (
        value(m, "tenantgate_statements_total", tenant="acme", command="insert", outcome="rejected")
        == 1
    )
    assert (
        value(
            m,
            "tenantgate_statements_total",
            tenant="globex",
            command="update",
            outcome="would_reject",
        )
        == 1
    )
    assert (
        value(
            m, "tenantgate_statements_total", tenant="globex", command="select", outcome="allowed"
        )
        is None
    )
    hist = "tenantgate_statement_duration_seconds"
    assert value(m, hist + "_count", tenant="acme", command="select") == 2
    assert value(m, hist + "_sum", tenant="acme", command="select") == pytest.approx(0.204)
    assert value(m, hist + "_bucket", tenant="acme", command="select", le="0.005") == 1
    assert value(m, hist + "_bucket", tenant="acme", command="select", le="0.25") == 2
    # A rejected statement (duration None) is counted but not observed.
    assert value(m, hist + "_count", tenant="acme", command="insert") is None
    assert value(m, hist + "_count", tenant="globex", command="update") == 1
    reason = "missing_tenant_predicate"
    assert value(m, "tenantgate_rejections_total", tenant="acme", reason=reason) == 1
    assert value(m, "tenantgate_rejections_total", tenant="globex", reason=reason) == 1
    assert value(m, "tenantgate_rejections_total", tenant="globex", reason="statement_class") == 1
    assert value(m, "tenantgate_bytes_total", tenant="acme", direction="in") == 100
    assert value(m, "tenantgate_bytes_total", tenant="acme", direction="out") == 2000
    assert value(m, "tenantgate_bytes_total", tenant="globex", direction="in") == 7
    assert value(m, "tenantgate_bytes_total", tenant="globex", direction="out") == 0
    assert value(m, "tenantgate_rows_total", tenant="acme") == 3
    assert value(m, "tenantgate_rows_total", tenant="globex") == 5
    assert value(m, "tenantgate_rate_limited_total", tenant="globex") == 1
    assert value(m, "tenantgate_rate_limited_total", tenant="acme") is None


def test_buckets_span_half_a_millisecond_to_thirty_seconds() -> None:
    assert DURATION_BUCKETS[0] == 0.0005
    assert DURATION_BUCKETS[-1] == 30.0
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


def test_configured_tenants_start_at_zero() -> None:
    m = Metrics(["acme", "globex"])
    for tenant in ("acme", "globex", "unknown"):
        assert value(m, "tenantgate_client_connections", tenant=tenant) == 0
        assert value(m, "tenantgate_rows_total", tenant=tenant) == 0
    assert value(m, "tenantgate_config_reloads_total", outcome="success") == 0
    assert value(m, "tenantgate_config_reloads_total", outcome="failure") == 0
    assert value(m, "tenantgate_audit_dropped_total") == 0


def test_unconfigured_tenant_is_unknown() -> None:
    m = Metrics(["acme"])
    assert m.tenant_label("acme") == "acme"
    assert m.tenant_label('evil"} 1\nfake') == "unknown"
    assert m.tenant_label(None) == "unknown"
    s = m.session("mallory")
    assert s.tenant == "unknown"
    s.opened()
    s.statement("select", "allowed", 0.01)
    assert value(m, "tenantgate_client_connections", tenant="unknown") == 1
    assert tenants_in(m) == {"acme", "unknown"}


def test_command_labels_are_a_fixed_set() -> None:
    m = Metrics(["acme"])
    s = m.session("acme")
    s.statement("SELECT", "allowed", None)
    s.statement("copy", "allowed", 0.1)
    s.statement("vacuum", "error", None)
    commands = {
        smp.labels["command"]
        for f in m.registry.collect()
        for smp in f.samples
        if "command" in smp.labels
    }
    assert commands == {"select", "other"}
    assert (
        value(m, "tenantgate_statements_total", tenant="acme", command="other", outcome="allowed")
        == 1
    )


def test_bad_outcomes_are_programming_errors() -> None:
    m = Metrics(["acme"])
    with pytest.raises(ValueError, match="outcome"):
        m.session("acme").statement("select", "maybe", None)
    assert b'command="select"' not in m.render()  # the refused call counted nothing
    with pytest.raises(ValueError, match="outcome"):
        m.config_reload("partial")


def test_session_caches_its_children() -> None:
    m = Metrics(["acme"])
    s = m.session("acme")
    s.statement("select", "allowed", 0.001)
    s.flush()
    first = dict(s._statements)
    s.statement("select", "allowed", 0.001)
    s.flush()
    assert s._statements == first
    assert len(s._statements) == 1


def test_tallies_reach_the_series_at_collect_and_at_close() -> None:
    m = Metrics(["acme"])
    s = m.session("acme")
    s.opened()
    s.statement("select", "allowed", 0.001)
    s.bytes_in(10)
    # Nothing is added per statement; collecting the registry flushes every live session.
    assert s._statements == {}
    assert value(m, "tenantgate_bytes_total", tenant="acme", direction="in") == 10
    assert s._statements != {}
    s.rows(4)
    s.closed()
    assert m._live == set()
    assert value(m, "tenantgate_rows_total", tenant="acme") == 4
    # A response that completes after the session closed is still counted.
    s.statement("select", "error", 0.002)
    assert (
        value(m, "tenantgate_statements_total", tenant="acme", command="select", outcome="error")
        == 1
    )


@pytest.mark.parametrize(
    "durations",
    [
        [0.0001, 0.0005, 0.0005001, 0.003, 29.9, 30.0, 31.0, 1e9],
        [b * f for b in DURATION_BUCKETS for f in (0.5, 1.0, 1.5)],
    ],
)
def test_tallied_histogram_equals_observe(durations: list[float]) -> None:
    """Flushing bucket tallies must give exactly what prometheus_client's observe gives."""
    tallied, observed = Metrics(["acme"]), Metrics(["acme"])
    session = tallied.session("acme")
    for duration in durations:
        session.statement("select", "allowed", duration)
    child = observed._statement_duration.labels("acme", "select")
    for duration in durations:
        child.observe(duration)

    def samples(m: Metrics) -> list[tuple[str, dict[str, str], float]]:
        return [
            (s.name, s.labels, s.value)
            for f in m.registry.collect()
            if f.name == "tenantgate_statement_duration_seconds"
            for s in f.samples
            if not s.name.endswith("_created")
        ]

    assert samples(tallied) == samples(observed)
    assert samples(tallied)  # the series exist


def test_set_tenants_removes_every_series_of_a_removed_tenant() -> None:
    m = Metrics(["acme", "globex"])
    g = m.session("globex")
    g.opened()
    g.statement("select", "allowed", 0.01)
    g.statement("delete", "rejected", None)
    g.rejected("missing_tenant_predicate")
    g.bytes_in(1)
    g.rows(1)
    g.rate_limited()
    m.session("acme").statement("select", "allowed", 0.01)

    m.set_tenants(["acme", "initech"])

    assert tenants_in(m) == {"acme", "initech", "unknown"}
    assert m.tenant_label("globex") == "unknown"
    assert m.tenant_label("initech") == "initech"
    assert value(m, "tenantgate_client_connections", tenant="initech") == 0
    assert (
        value(m, "tenantgate_statements_total", tenant="acme", command="select", outcome="allowed")
        == 1
    )
    # The still-open globex session records into nothing, even for new children.
    g.statement("select", "allowed", 0.01)
    g.statement("update", "allowed", 0.01)
    g.rejected("other_rule")
    g.closed()
    g.rate_limited()
    assert "globex" not in tenants_in(m)


def test_readded_tenant_starts_fresh() -> None:
    m = Metrics(["acme"])
    m.session("acme").rows(10)
    m.set_tenants([])
    m.set_tenants(["acme"])
    assert value(m, "tenantgate_rows_total", tenant="acme") == 0


def test_process_wide_counters() -> None:
    m = Metrics(["acme"])
    m.auth_failure("password")
    m.auth_failure("password")
    m.auth_failure("unknown_user")
    m.config_reload("success")
    m.config_reload("failure")
    m.config_reload("failure")
    m.audit_dropped()
    m.audit_dropped(4)
    m.audit_dropped(0)
    assert value(m, "tenantgate_auth_failures_total", reason="password") == 2
    assert value(m, "tenantgate_auth_failures_total", reason="unknown_user") == 1
    assert value(m, "tenantgate_config_reloads_total", outcome="success") == 1
    assert value(m, "tenantgate_config_reloads_total", outcome="failure") == 2
    assert value(m, "tenantgate_audit_dropped_total") == 5


def test_cache_and_upstream_sources() -> None:
    m = Metrics(["acme"])
    assert value(m, "tenantgate_parse_cache_hits_total") == 0
    assert value(m, "tenantgate_upstream_connections", state="active") == 0
    stats = {"hits": 0, "misses": 0}
    m.set_cache_source(lambda: (stats["hits"], stats["misses"]))
    m.set_upstream_source(lambda: {"active": 3, "idle": 2})
    stats.update(hits=41, misses=9)
    assert value(m, "tenantgate_parse_cache_hits_total") == 41
    assert value(m, "tenantgate_parse_cache_misses_total") == 9
    assert value(m, "tenantgate_upstream_connections", state="active") == 3
    assert value(m, "tenantgate_upstream_connections", state="idle") == 2


def test_a_failing_source_does_not_break_the_scrape(caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics(["acme"])

    def broken() -> tuple[int, int]:
        raise RuntimeError("boom")

    m.set_cache_source(broken)
    text = m.render().decode()
    assert "tenantgate_parse_cache_hits_total 0.0" in text
    assert "parse cache metrics source failed" in caplog.text


def test_render_is_text_format_without_created_samples() -> None:
    m = Metrics(["acme"])
    s = m.session("acme")
    s.statement("select", "allowed", 0.01)
    s.rejected("r")
    text = m.render().decode()
    assert "_created" not in text
    names = {f.name for f in text_string_to_metric_families(text)}
    assert names == set(CONTRACT) | set(ADDITIONS)
    assert 'tenantgate_statements_total{command="select",outcome="allowed",tenant="acme"} 1.0' in (
        text
    )


async def test_render_async_samples_sources_on_the_loop() -> None:
    m = Metrics(["acme"])
    seen: list[str] = []

    def source() -> tuple[int, int]:
        seen.append(threading.current_thread().name)
        return (5, 6)

    m.set_cache_source(source)
    text = (await m.render_async()).decode()
    assert "tenantgate_parse_cache_hits_total 5.0" in text
    assert "tenantgate_parse_cache_misses_total 6.0" in text
    assert seen == [threading.current_thread().name]


# --- HTTP ----------------------------------------------------------------------------------


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return status, headers, body


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, dict[str, object], int]]:
    m = Metrics(["acme", "globex"])
    state: dict[str, object] = {"ready": True}

    async def ready() -> bool:
        r = state["ready"]
        if isinstance(r, Exception):
            raise r
        if r == "slow":
            await asyncio.sleep(10)
        return bool(r)

    server = await start_http("127.0.0.1", 0, m, ready)
    try:
        yield m, state, server.port
    finally:
        await server.close()


async def test_http_metrics(served: tuple[Metrics, dict[str, object], int]) -> None:
    m, _, port = served
    assert port > 0
    m.session("acme").statement("select", "allowed", 0.002)
    status, headers, body = await http(port, get("/metrics"))
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert headers["connection"] == "close"
    assert int(headers["content-length"]) == len(body)
    text = body.decode()
    assert 'tenantgate_statements_total{command="select",outcome="allowed",tenant="acme"} 1.0' in (
        text
    )
    assert "_created" not in text
    status, _, body = await http(port, get("/metrics?x=1"))
    assert status == 200


async def test_http_health_and_readiness(
    served: tuple[Metrics, dict[str, object], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, state, port = served
    assert (await http(port, get("/healthz")))[::2] == (200, b"ok")
    assert (await http(port, get("/readyz")))[0] == 200
    state["ready"] = False
    assert (await http(port, get("/readyz")))[::2] == (503, b"not ready")
    state["ready"] = RuntimeError("upstream down")
    assert (await http(port, get("/readyz")))[0] == 503
    monkeypatch.setattr(metrics_mod, "READY_TIMEOUT_S", 0.05)
    state["ready"] = "slow"
    assert (await http(port, get("/readyz")))[0] == 503


async def test_http_errors(
    served: tuple[Metrics, dict[str, object], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, port = served
    assert (await http(port, get("/nope")))[0] == 404
    status, headers, _ = await http(port, get("/metrics", "POST"))
    assert status == 405
    assert headers["allow"] == "GET, HEAD"
    status, headers, body = await http(port, get("/healthz", "HEAD"))
    assert status == 200
    assert body == b""
    assert headers["content-length"] == "2"
    assert (await http(port, b"garbage\r\n\r\n"))[0] == 400
    huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 12000 + b"\r\n\r\n"
    assert (await http(port, huge))[0] == 431
    monkeypatch.setattr(metrics_mod, "REQUEST_TIMEOUT_S", 0.05)
    assert (await http(port, b"GET /metrics HTTP/1.1\r\n"))[0] == 408


async def test_http_close_frees_the_port() -> None:
    m = Metrics(["acme"])

    async def ready() -> bool:
        return True

    server = await start_http("127.0.0.1", 0, m, ready)
    port = server.port
    await server.close()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_http_render_failure_is_a_500(
    served: tuple[Metrics, dict[str, object], int], caplog: pytest.LogCaptureFixture
) -> None:
    m, _, port = served

    class Broken:
        def collect(self) -> list[object]:
            raise RuntimeError("boom")

    m.registry.register(Broken())  # type: ignore[arg-type]
    assert (await http(port, get("/metrics")))[0] == 500
    assert "rendering metrics failed" in caplog.text
    assert (await http(port, get("/healthz")))[0] == 200


async def test_http_connection_cap(
    served: tuple[Metrics, dict[str, object], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, port = served
    monkeypatch.setattr(metrics_mod, "MAX_HTTP_CONNECTIONS", 2)
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await asyncio.sleep(0.05)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), 5) == b""  # refused while two are open
    writer.close()
    await writer.wait_closed()
    for _, w in idle:
        w.close()
        await w.wait_closed()
    await asyncio.sleep(0.05)
    assert (await http(port, get("/healthz")))[0] == 200
