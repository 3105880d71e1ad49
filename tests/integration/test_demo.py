"""``tenantgate demo`` end to end: both tenants through the proxy, a rejection, RLS, cleanup.

The demo runs in-process on its own event loop in a thread (the clients here are
blocking psycopg connections), on free ports, with the embedded PostgreSQL
(or system binaries when the wheel is missing).  One more test runs the real
command in a subprocess and stops it with SIGINT, as a user's Ctrl-C would.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest

from support.proxy import LoopThread
from tenantgate.cluster import TemporaryCluster
from tenantgate.config import load_policy
from tenantgate.demo import SEED_ORDERS, TENANT_USERS, DemoHandles, configure_parser, start_demo

T = TypeVar("T")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class DemoThread(LoopThread):
    """A demo on its own event loop in a daemon thread."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("tenantgate-demo")
        self.metrics_port = free_port()
        self.handles: DemoHandles = self.call(
            lambda: start_demo(None, 0, self.metrics_port, workdir), timeout=180
        )

    def stop(self) -> None:
        self.shut_down(self.handles.stop, timeout=120)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DemoThread]:
    runner = DemoThread(tmp_path_factory.mktemp("demo") / "work")
    try:
        yield runner
    finally:
        runner.stop()


def connect(demo: DemoThread, tenant: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(demo.handles.url(TENANT_USERS[tenant]), autocommit=True)


@pytest.mark.parametrize("tenant", sorted(TENANT_USERS))
def test_each_tenant_reads_its_own_rows(demo: DemoThread, tenant: str) -> None:
    with connect(demo, tenant) as conn:
        rows = conn.execute(
            "SELECT tenant_id, item FROM orders WHERE tenant_id = %s", (tenant,)
        ).fetchall()
        assert len(rows) == SEED_ORDERS[tenant]
        assert {row[0] for row in rows} == {tenant}
        # The shared table is readable by everyone.
        plans = conn.execute("SELECT name FROM plans ORDER BY id").fetchall()
        assert [p[0] for p in plans] == ["free", "pro", "enterprise"]
        joined = conn.execute(
            "SELECT count(*) FROM orders o JOIN invoices i ON i.order_id = o.id "
            "WHERE o.tenant_id = %s AND i.tenant_id = %s",
            (tenant, tenant),
        ).fetchone()
        assert joined == (SEED_ORDERS[tenant],)


def test_missing_predicate_is_rejected_with_its_reason(demo: DemoThread) -> None:
    with connect(demo, "acme") as conn:
        with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
            conn.execute("SELECT * FROM orders")
        assert info.value.sqlstate == "42501"
        assert "tenantgate: missing_tenant_predicate" in str(info.value)
        assert info.value.diag.message_hint  # says how to fix it
        # The connection stays usable.
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_other_tenants_rows_and_escapes_are_rejected(demo: DemoThread) -> None:
    with connect(demo, "acme") as conn:
        for sql, rule in (
            ("SELECT * FROM orders WHERE tenant_id = 'globex'", "wrong_tenant"),
            ("SET app.tenant_id = 'globex'", "setting_change"),
            ("TRUNCATE orders", "statement_class"),
            ("INSERT INTO plans (id, name, monthly_price) VALUES (9, 'x', 1)", "shared_table"),
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege) as info:
                conn.execute(sql)
            assert rule in str(info.value), sql


def test_writes_stay_inside_the_tenant(demo: DemoThread) -> None:
    with connect(demo, "globex") as conn:
        customer = conn.execute(
            "SELECT id FROM customers WHERE tenant_id = 'globex' ORDER BY id LIMIT 1"
        ).fetchone()
        assert customer is not None
        inserted = conn.execute(
            "INSERT INTO orders (tenant_id, customer_id, item, amount) "
            "VALUES ('globex', %s, 'test item', 1) RETURNING id",
            (customer[0],),
        ).fetchone()
        assert inserted is not None
        conn.execute("DELETE FROM orders WHERE tenant_id = 'globex' AND id = %s", (inserted[0],))
        count = conn.execute("SELECT count(*) FROM orders WHERE tenant_id = 'globex'").fetchone()
        assert count == (SEED_ORDERS["globex"],)


def test_rls_confines_the_upstream_role_directly(demo: DemoThread) -> None:
    with psycopg.connect(demo.handles.direct_url(), autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM orders").fetchone() == (0,)
        with conn.transaction():
            conn.execute("SELECT set_config('app.tenant_id', 'globex', true)")
            tenants = conn.execute("SELECT DISTINCT tenant_id FROM orders").fetchall()
        assert tenants == [("globex",)]


def test_rls_mode_after_reload_confines_unfiltered_queries(demo: DemoThread) -> None:
    path = demo.handles.policy_path
    original = path.read_text(encoding="utf-8")
    assert "\nmode: both\n" in original
    try:
        path.write_text(original.replace("\nmode: both\n", "\nmode: rls\n"), encoding="utf-8")
        assert demo.call(demo.handles.app.reload) is True
        with connect(demo, "acme") as conn:
            rows = conn.execute("SELECT tenant_id FROM orders").fetchall()
        assert len(rows) == SEED_ORDERS["acme"]
        assert {r[0] for r in rows} == {"acme"}
    finally:
        path.write_text(original, encoding="utf-8")
        assert demo.call(demo.handles.app.reload) is True


def test_banner_has_copy_paste_commands(demo: DemoThread) -> None:
    banner = demo.handles.banner()
    for user in TENANT_USERS.values():
        assert f'psql "{demo.handles.url(user)}"' in banner
    assert demo.handles.metrics_url in banner
    assert "SELECT * FROM orders WHERE tenant_id = 'acme';" in banner
    assert "SELECT * FROM orders;" in banner
    assert "missing_tenant_predicate" in banner
    assert str(demo.handles.policy_path) in banner


def test_policy_file_is_what_the_proxy_serves(demo: DemoThread) -> None:
    policy = load_policy(demo.handles.policy_path)
    assert policy.mode == "both"
    assert policy.metrics.enabled
    assert policy.metrics.port == demo.metrics_port
    assert set(policy.tenants) == set(TENANT_USERS)
    assert not policy.plaintext_users()
    assert oct(demo.handles.policy_path.stat().st_mode & 0o777) == "0o600"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_show_per_tenant_numbers(demo: DemoThread) -> None:
    base = f"http://127.0.0.1:{demo.handles.metrics_port}"
    try:
        _get(f"{base}/healthz")
    except urllib.error.URLError:
        wired = [name for name in dir(demo.handles.app) if "metrics" in name.lower()]
        if not wired:
            pytest.skip("ProxyApp does not start the metrics endpoint yet")
        raise
    with connect(demo, "acme") as conn:
        conn.execute("SELECT * FROM orders WHERE tenant_id = 'acme'")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("SELECT * FROM orders")
    assert _get(f"{base}/healthz")[0] == 200
    assert _get(f"{base}/readyz")[0] == 200
    status, body = _get(f"{base}/metrics")
    assert status == 200
    assert re.search(r'tenantgate_statements_total\{[^}]*tenant="acme"', body), body[:2000]
    assert re.search(r'tenantgate_rejections_total\{[^}]*tenant="acme"', body), body[:2000]


def test_stop_removes_everything_even_with_a_client_connected(tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    runner = DemoThread(workdir)
    handles = runner.handles
    assert isinstance(handles.cluster, TemporaryCluster)
    cluster_root = handles.cluster.root
    assert workdir.is_dir()
    assert cluster_root.is_dir()
    conn = connect(runner, "globex")
    try:
        runner.stop()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1 FROM plans")
    finally:
        conn.close()
    assert not workdir.exists()
    assert not cluster_root.exists()


def _read_lines(stream: Any, lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


@pytest.mark.slow
def test_command_runs_until_sigint_then_cleans_up() -> None:
    port, metrics_port = free_port(), free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tenantgate.demo",
            "--port",
            str(port),
            "--metrics-port",
            str(metrics_port),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    output: list[str] = []
    try:
        deadline = time.monotonic() + 180
        while not any("Press Ctrl-C" in line for line in output):
            assert proc.poll() is None, "".join(output)
            assert time.monotonic() < deadline, "".join(output)
            try:
                output.append(lines.get(timeout=1))
            except queue.Empty:
                continue
        text = "".join(output)
        url = re.search(r'psql "(postgresql://acme_app:[^"]+)"', text)
        assert url is not None, text
        assert f"127.0.0.1:{port}/demo" in url.group(1)
        policy = re.search(r"policy\s+(\S+)", text)
        files = re.search(r"files in (\S+?)\)", text)
        assert policy is not None, text
        assert files is not None, text
        with psycopg.connect(url.group(1), autocommit=True) as conn:
            rows = conn.execute("SELECT item FROM orders WHERE tenant_id = 'acme'").fetchall()
            assert len(rows) == SEED_ORDERS["acme"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    assert proc.stdout is not None
    proc.stdout.close()
    while not lines.empty():
        output.append(lines.get())
    assert not Path(policy.group(1)).exists(), "".join(output)
    assert not Path(files.group(1)).exists(), "".join(output)
    assert "Traceback" not in "".join(output)


def test_demo_database_passes_tenantgate_check(demo: DemoThread) -> None:
    dbcheck = pytest.importorskip("tenantgate.dbcheck")
    findings = dbcheck.run_check(load_policy(demo.handles.policy_path))
    assert dbcheck.check_exit_code(findings) == 0, dbcheck.format_findings(findings)


def test_help_text_explains_the_demo() -> None:
    parser = argparse.ArgumentParser(prog="tenantgate demo")
    configure_parser(parser)
    text = parser.format_help()
    for needle in ("--upstream", "--port", "--metrics-port", "Ctrl-C", "embedded", "root"):
        assert needle in text, needle
    args = parser.parse_args([])
    assert (args.upstream, args.port, args.metrics_port) == (None, 6432, 9187)
