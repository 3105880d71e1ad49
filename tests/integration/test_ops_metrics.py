"""Issue 5, metrics: every ``tenantgate_*`` series moves as documented, per tenant.

Each test runs a real :class:`~tenantgate.app.ProxyApp` (``support.proxy``)
with the metrics endpoint on a free port, drives two tenants (acme, globex)
through it with psycopg, scrapes ``/metrics`` over HTTP and parses it with
prometheus_client's own parser.  Assertions are on deltas between scrapes.
"""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors

from support.db import TenantDb
from support.proxy import RunningProxy

pytestmark = pytest.mark.postgres

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
TENANT_LABELLED = (
    "tenantgate_client_connections",
    "tenantgate_statements_total",
    "tenantgate_statement_duration_seconds_count",
    "tenantgate_rejections_total",
    "tenantgate_bytes_total",
    "tenantgate_rows_total",
    "tenantgate_rate_limited_total",
)


# --- helpers -----------------------------------------------------------------------------


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        body = exc.read().decode()
        exc.close()
        return exc.code, body


def scrape(port: int) -> Samples:
    status, body = http_get(port, "/metrics")
    assert status == 200, body
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, lbl), v in samples.items() if n == name and wanted <= set(lbl))


def delta(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def tenant_labels(samples: Samples) -> set[str]:
    return {dict(lbl)["tenant"] for (_, lbl) in samples if "tenant" in dict(lbl)}


def has_series(samples: Samples, name: str, **labels: str) -> bool:
    wanted = set(labels.items())
    return any(n == name and wanted <= set(lbl) for (n, lbl) in samples)


def connect(proxy: RunningProxy, db: TenantDb, tenant: str) -> psycopg.Connection[Any]:
    user = db.user(tenant)
    return psycopg.connect(proxy.dsn(user.name, user.password), autocommit=True)


def wait_until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


@pytest.fixture
def proxy(tenant_db: TenantDb) -> Iterator[RunningProxy]:
    running = RunningProxy(tenant_db.policy("both", metrics_port=0))
    try:
        yield running
    finally:
        running.stop()


def metrics_port(proxy: RunningProxy) -> int:
    port = proxy.app.metrics_port
    assert port is not None
    return port


# --- tests ---------------------------------------------------------------------------------


def test_connections_gauge_moves_per_tenant(proxy: RunningProxy, tenant_db: TenantDb) -> None:
    port = metrics_port(proxy)
    start = scrape(port)
    # Configured tenants have their gauge from startup, at zero.
    for tenant in ("acme", "globex", "initech", "unknown"):
        assert has_series(start, "tenantgate_client_connections", tenant=tenant)
        assert value(start, "tenantgate_client_connections", tenant=tenant) == 0
    a1, a2, g1 = (connect(proxy, tenant_db, t) for t in ("acme", "acme", "globex"))
    try:
        s = scrape(port)
        assert value(s, "tenantgate_client_connections", tenant="acme") == 2
        assert value(s, "tenantgate_client_connections", tenant="globex") == 1
        assert value(s, "tenantgate_client_connections", tenant="initech") == 0
        assert value(s, "tenantgate_upstream_connections", state="idle") == 3
        assert value(s, "tenantgate_upstream_connections", state="active") == 0
        a2.close()

        def acme_down() -> bool:
            return value(scrape(port), "tenantgate_client_connections", tenant="acme") == 1

        wait_until(acme_down)
    finally:
        for conn in (a1, a2, g1):
            conn.close()
    wait_until(lambda: value(scrape(port), "tenantgate_client_connections") == 0)
    end = scrape(port)
    assert value(end, "tenantgate_upstream_connections", state="idle") == 0


def test_statements_rows_bytes_and_durations_per_tenant(
    proxy: RunningProxy, clean_tenant_db: TenantDb
) -> None:
    db = clean_tenant_db
    port = metrics_port(proxy)
    with connect(proxy, db, "acme") as acme, connect(proxy, db, "globex") as globex:
        before = scrape(port)
        # acme, extended protocol: 2 selects (5 rows each) and an insert (1 row).
        acme.execute("SELECT id FROM orders WHERE tenant_id = %s", ("acme",)).fetchall()
        acme.execute("SELECT id FROM orders WHERE tenant_id = %s", ("acme",)).fetchall()
        acme.execute("INSERT INTO orders (tenant_id, item) VALUES (%s, %s)", ("acme", "m-row"))
        extended = scrape(port)
        # acme, simple protocol: 1 allowed select, 1 statement the database refuses,
        # 1 the policy refuses.
        acme.execute("SELECT id FROM orders WHERE tenant_id = 'acme'").fetchall()
        with pytest.raises(errors.DivisionByZero):
            acme.execute("SELECT 1/0 FROM orders WHERE tenant_id = 'acme'")
        with pytest.raises(errors.InsufficientPrivilege, match="missing_tenant_predicate"):
            acme.execute("SELECT * FROM orders")
        mid = scrape(port)
        # globex: 1 allowed select (5 rows), 2 refused by different rules.
        globex.execute("SELECT id FROM orders WHERE tenant_id = %s", ("globex",)).fetchall()
        rows_globex = scrape(port)
        with pytest.raises(errors.InsufficientPrivilege, match="wrong_tenant"):
            globex.execute("DELETE FROM orders WHERE tenant_id = 'acme'")
        with pytest.raises(errors.InsufficientPrivilege, match="denied_function"):
            globex.execute("SELECT pg_sleep(0)")
        after = scrape(port)

    stmts = "tenantgate_statements_total"
    hist = "tenantgate_statement_duration_seconds_count"
    rows = "tenantgate_rows_total"
    # acme, extended protocol segment
    assert delta(extended, before, stmts, tenant="acme", command="select", outcome="allowed") == 2
    assert delta(extended, before, stmts, tenant="acme", command="insert", outcome="allowed") == 1
    assert delta(extended, before, stmts, tenant="acme") == 3
    assert delta(extended, before, rows, tenant="acme") == 11
    assert delta(extended, before, hist, tenant="acme", command="select") == 2
    assert delta(extended, before, hist, tenant="acme", command="insert") == 1
    # acme, whole run
    assert delta(mid, before, stmts, tenant="acme", command="select", outcome="allowed") == 3
    assert delta(mid, before, stmts, tenant="acme", command="insert", outcome="allowed") == 1
    assert delta(mid, before, stmts, tenant="acme", command="select", outcome="error") == 1
    assert delta(mid, before, stmts, tenant="acme", command="select", outcome="rejected") == 1
    assert delta(mid, before, stmts, tenant="globex") == 0
    rej = "tenantgate_rejections_total"
    assert delta(mid, before, rej, tenant="acme", reason="missing_tenant_predicate") == 1
    assert delta(mid, before, rej, tenant="acme") == 1
    assert delta(mid, before, rows, tenant="globex") == 0
    # Statements that ran upstream (allowed or error) are timed.
    assert delta(mid, before, hist, tenant="acme", command="select") == 4
    assert delta(mid, before, hist, tenant="acme", command="insert") == 1
    assert delta(mid, before, "tenantgate_statement_duration_seconds_sum", tenant="acme") > 0
    bucket = "tenantgate_statement_duration_seconds_bucket"
    assert delta(mid, before, bucket, tenant="acme", command="select", le="+Inf") == 4
    for direction in ("in", "out"):
        assert delta(mid, before, "tenantgate_bytes_total", tenant="acme", direction=direction) > 0
        assert (
            delta(mid, before, "tenantgate_bytes_total", tenant="globex", direction=direction) == 0
        )
    # globex
    assert delta(rows_globex, mid, rows, tenant="globex") == 5
    assert delta(after, mid, stmts, tenant="globex", command="select", outcome="allowed") == 1
    assert delta(after, mid, stmts, tenant="globex", command="delete", outcome="rejected") == 1
    assert delta(after, mid, stmts, tenant="globex", command="select", outcome="rejected") == 1
    assert delta(after, mid, rej, tenant="globex", reason="wrong_tenant") == 1
    assert delta(after, mid, rej, tenant="globex", reason="denied_function") == 1
    assert delta(after, mid, hist, tenant="globex", command="select") == 1
    assert delta(after, mid, stmts, tenant="acme") == 0
    assert delta(after, mid, rows, tenant="acme") == 0
    assert delta(after, mid, "tenantgate_bytes_total", tenant="globex", direction="in") > 0
    assert delta(after, mid, "tenantgate_bytes_total", tenant="acme", direction="out") == 0


def test_rows_of_a_simple_query_in_both_mode(proxy: RunningProxy, tenant_db: TenantDb) -> None:
    port = metrics_port(proxy)
    with connect(proxy, tenant_db, "acme") as acme:
        before = scrape(port)
        got = acme.execute("SELECT id FROM orders WHERE tenant_id = 'acme'").fetchall()
        after = scrape(port)
    assert len(got) == 5
    assert delta(after, before, "tenantgate_rows_total", tenant="acme") == 5


def test_rejected_statement_is_not_also_counted_as_error(
    proxy: RunningProxy, tenant_db: TenantDb
) -> None:
    port = metrics_port(proxy)
    with connect(proxy, tenant_db, "acme") as acme:
        before = scrape(port)
        with pytest.raises(errors.InsufficientPrivilege):
            acme.execute("SELECT * FROM orders")  # simple protocol
        with pytest.raises(errors.InsufficientPrivilege):
            acme.execute("SELECT * FROM orders WHERE id = %s", (1,))  # extended protocol
        after = scrape(port)
    stmts = "tenantgate_statements_total"
    assert delta(after, before, stmts, tenant="acme", outcome="rejected") == 2
    # Each statement has exactly one outcome; nothing ran upstream, so nothing was timed.
    assert delta(after, before, stmts, tenant="acme") == 2
    assert delta(after, before, stmts, tenant="acme", outcome="error") == 0
    assert delta(after, before, "tenantgate_statement_duration_seconds_count", tenant="acme") == 0


def test_would_reject_in_dry_run(tenant_db: TenantDb) -> None:
    proxy = RunningProxy(tenant_db.policy("both", metrics_port=0, dry_run=True))
    try:
        port = metrics_port(proxy)
        with connect(proxy, tenant_db, "acme") as acme, connect(proxy, tenant_db, "globex") as gx:
            before = scrape(port)
            # Forwarded anyway; in `both` mode RLS still limits it to acme's rows.
            rows = acme.execute("SELECT tenant_id FROM orders WHERE id > %s", (0,)).fetchall()
            assert rows
            assert {r[0] for r in rows} == {"acme"}
            gx.execute("SELECT id FROM orders WHERE tenant_id = %s", ("globex",)).fetchall()
            after = scrape(port)
    finally:
        proxy.stop()
    stmts = "tenantgate_statements_total"
    assert delta(after, before, stmts, tenant="acme", command="select", outcome="would_reject") == 1
    assert delta(after, before, stmts, tenant="acme", outcome="rejected") == 0
    assert delta(after, before, "tenantgate_rejections_total", tenant="acme") == 1
    assert (
        delta(after, before, "tenantgate_rejections_total", reason="missing_tenant_predicate") == 1
    )
    assert delta(after, before, stmts, tenant="globex", outcome="would_reject") == 0
    assert delta(after, before, stmts, tenant="globex", outcome="allowed") == 1
    assert delta(after, before, "tenantgate_rows_total", tenant="acme") == len(rows)


def test_dry_run_statement_has_one_outcome(tenant_db: TenantDb) -> None:
    proxy = RunningProxy(tenant_db.policy("both", metrics_port=0, dry_run=True))
    try:
        port = metrics_port(proxy)
        with connect(proxy, tenant_db, "acme") as acme:
            before = scrape(port)
            acme.execute("SELECT tenant_id FROM orders WHERE id > %s", (0,)).fetchall()
            after = scrape(port)
    finally:
        proxy.stop()
    stmts = "tenantgate_statements_total"
    assert delta(after, before, stmts, tenant="acme", outcome="would_reject") == 1
    assert delta(after, before, stmts, tenant="acme") == 1


def test_auth_failures_by_reason(proxy: RunningProxy) -> None:
    port = metrics_port(proxy)
    before = scrape(port)
    for _ in range(2):
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(proxy.dsn("acme_app", "wrong"))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn("no_such_user", "whatever"))
    after = scrape(port)
    auth = "tenantgate_auth_failures_total"
    assert delta(after, before, auth, reason="wrong_password") == 2
    assert delta(after, before, auth, reason="unknown_user") == 1
    # Failed logins have no tenant: no tenant series moved.
    assert delta(after, before, "tenantgate_client_connections") == 0
    assert delta(after, before, "tenantgate_bytes_total") == 0


def test_parse_cache_hits_and_misses(proxy: RunningProxy, tenant_db: TenantDb) -> None:
    port = metrics_port(proxy)
    with connect(proxy, tenant_db, "acme") as acme, connect(proxy, tenant_db, "globex") as globex:
        before = scrape(port)
        acme.execute("SELECT item FROM orders WHERE tenant_id = 'acme' AND id > 100000")
        mid = scrape(port)
        assert delta(mid, before, "tenantgate_parse_cache_misses_total") == 1
        assert delta(mid, before, "tenantgate_parse_cache_hits_total") == 0
        for _ in range(3):
            acme.execute("SELECT item FROM orders WHERE tenant_id = 'acme' AND id > 100000")
        # The cache is keyed by statement text and shared by every tenant's sessions.
        globex.execute("SELECT item FROM orders WHERE tenant_id = 'globex' AND id > 100000")
        after = scrape(port)
    assert delta(after, mid, "tenantgate_parse_cache_hits_total") == 3
    assert delta(after, mid, "tenantgate_parse_cache_misses_total") == 1


def test_upstream_connections_active_while_a_statement_runs(tenant_db: TenantDb) -> None:
    policy = tenant_db.policy("both", metrics_port=0, allowed_functions=["pg_sleep"])
    proxy = RunningProxy(policy)
    try:
        port = metrics_port(proxy)
        with connect(proxy, tenant_db, "acme") as acme, connect(proxy, tenant_db, "globex"):
            worker = threading.Thread(target=lambda: acme.execute("SELECT pg_sleep(1)"))
            worker.start()
            try:

                def active() -> bool:
                    return (
                        value(scrape(port), "tenantgate_upstream_connections", state="active") == 1
                    )

                wait_until(active, timeout=0.9)
                s = scrape(port)
                assert value(s, "tenantgate_upstream_connections", state="idle") == 1
            finally:
                worker.join()
            s = scrape(port)
            assert value(s, "tenantgate_upstream_connections", state="active") == 0
            assert value(s, "tenantgate_upstream_connections", state="idle") == 2
    finally:
        proxy.stop()


def test_reloads_counted_and_removed_tenant_series_disappear(
    tenant_db: TenantDb, tmp_path: Path
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(tenant_db.policy_yaml("both", metrics_port=0))
    proxy = RunningProxy(tenant_db.policy("both", metrics_port=0))
    proxy.app.policy_path = path
    try:
        port = metrics_port(proxy)
        for tenant in ("acme", "globex", "initech"):
            with connect(proxy, tenant_db, tenant) as conn:
                conn.execute(f"SELECT id FROM orders WHERE tenant_id = '{tenant}'").fetchall()
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute("SELECT * FROM customers")
        before = scrape(port)
        assert tenant_labels(before) == {"acme", "globex", "initech", "unknown"}
        for name in TENANT_LABELLED[:6]:
            assert has_series(before, name, tenant="initech"), name
        assert value(before, "tenantgate_config_reloads_total", outcome="success") == 0
        assert value(before, "tenantgate_config_reloads_total", outcome="failure") == 0

        # A broken file: counted as a failure, nothing else changes.
        path.write_text("tenants: [this is not a policy\n")
        assert proxy.call(proxy.app.reload) is False
        broken = scrape(port)
        assert delta(broken, before, "tenantgate_config_reloads_total", outcome="failure") == 1
        assert delta(broken, before, "tenantgate_config_reloads_total", outcome="success") == 0
        assert tenant_labels(broken) == {"acme", "globex", "initech", "unknown"}

        # A good file without initech: success, and every initech series is gone.
        data = tenant_db.policy_dict("both", metrics_port=0)
        del data["tenants"]["initech"]
        path.write_text(yaml_dump(data))
        assert proxy.call(proxy.app.reload) is True
        after = scrape(port)
        assert delta(after, broken, "tenantgate_config_reloads_total", outcome="success") == 1
        assert delta(after, broken, "tenantgate_config_reloads_total", outcome="failure") == 0
        assert tenant_labels(after) == {"acme", "globex", "unknown"}
        for name in TENANT_LABELLED:
            assert not has_series(after, name, tenant="initech"), name
        # The other tenants' series are untouched.
        stmts = "tenantgate_statements_total"
        for tenant in ("acme", "globex"):
            assert value(after, stmts, tenant=tenant) == value(before, stmts, tenant=tenant) > 0
        # Their sessions keep counting under their own label only.
        with connect(proxy, tenant_db, "acme") as conn:
            conn.execute("SELECT id FROM orders WHERE tenant_id = 'acme'").fetchall()
        last = scrape(port)
        assert delta(last, after, stmts, tenant="acme", outcome="allowed") == 1
        assert tenant_labels(last) == {"acme", "globex", "unknown"}
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            connect(proxy, tenant_db, "initech")
        assert tenant_labels(scrape(port)) == {"acme", "globex", "unknown"}
    finally:
        proxy.stop()


def yaml_dump(data: dict[str, Any]) -> str:
    import yaml  # noqa: PLC0415 - only this test writes policy files

    return yaml.safe_dump(data, sort_keys=False)


def test_healthz_and_readyz(proxy: RunningProxy) -> None:
    port = metrics_port(proxy)
    assert http_get(port, "/healthz") == (200, "ok")
    assert http_get(port, "/readyz") == (200, "ready")
    assert http_get(port, "/nope")[0] == 404


def test_readyz_503_when_upstream_unreachable(tenant_db: TenantDb) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    policy = tenant_db.policy(
        "both", metrics_port=0, upstream={"port": closed_port, "connect_timeout_s": 1}
    )
    proxy = RunningProxy(policy)
    try:
        port = metrics_port(proxy)
        assert http_get(port, "/healthz") == (200, "ok")
        assert http_get(port, "/readyz") == (503, "not ready")
        # Clients get FATAL 08006 and the proxy stays up.
        user = tenant_db.user("acme")
        with pytest.raises(psycopg.OperationalError, match="upstream"):
            psycopg.connect(proxy.dsn(user.name, user.password))
        assert http_get(port, "/healthz") == (200, "ok")
    finally:
        proxy.stop()
