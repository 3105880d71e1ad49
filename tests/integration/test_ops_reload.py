"""Issue 5, reload and shutdown of a real ``tenantgate serve`` process.

SIGHUP: a broken policy file changes nothing (the old policy keeps serving, the
failure is logged and counted); a good one applies at once and entirely (new
users log in, existing sessions use it for their next statement, sessions of a
removed tenant end with FATAL 57P01 and its logins fail with 28P01).
SIGTERM: listening stops, open transactions may still COMMIT within
``limits.shutdown_timeout_s``, sessions left after it get FATAL 57P01 (their
transaction is rolled back), and the process exits 0.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from proxy_helpers import RawClient, error_fields
from psycopg import errors

from support.db import TenantDb

pytestmark = pytest.mark.postgres

TENANTGATE = Path(sys.executable).with_name("tenantgate")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Served:
    """``tenantgate serve --config FILE`` as a child process, on free ports."""

    def __init__(self, db: TenantDb, tmp_path: Path, **overrides: Any) -> None:
        self.db = db
        self.port = free_port()
        self.metrics_port = free_port()
        self.config = tmp_path / "policy.yaml"
        self.log_path = tmp_path / "serve.log"
        self.write(self.policy_dict(**overrides))
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(TENANTGATE), "serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, what="tenantgate serve to listen")

    def policy_dict(self, **overrides: Any) -> dict[str, Any]:
        mode = overrides.pop("mode", "both")
        return self.db.policy_dict(mode, self.port, metrics_port=self.metrics_port, **overrides)

    def write(self, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False)
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, f"tenantgate serve exited:\n{self.log()}"
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return self.http("/healthz")[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        os.kill(self.proc.pid, sig)

    def reload_and_wait(self, marker: str) -> None:
        """SIGHUP, then wait for one more log line containing ``marker``."""
        seen = self.log().count(marker)
        self.signal(signal.SIGHUP)
        wait_until(lambda: self.log().count(marker) > seen, what=f"log line {marker!r}")

    def http(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            body = exc.read().decode()
            exc.close()
            return exc.code, body

    def metric(self, name: str, **labels: str) -> float:
        status, text = self.http("/metrics")
        assert status == 200
        wanted = set(labels.items())
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and wanted <= set(s.labels.items())
        )

    def tenant_labels(self) -> set[str]:
        _, text = self.http("/metrics")
        return {
            s.labels["tenant"]
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if "tenant" in s.labels
        }

    def dsn(self, user: str, password: str) -> str:
        return (
            f"host=127.0.0.1 port={self.port} dbname={self.db.database} user={user} "
            f"password={password} sslmode=disable connect_timeout=5"
        )

    def connect(self, user: str, password: str, **kwargs: Any) -> psycopg.Connection[Any]:
        return psycopg.connect(self.dsn(user, password), autocommit=True, **kwargs)

    def tenant(self, tenant: str) -> psycopg.Connection[Any]:
        user = self.db.user(tenant)
        return self.connect(user.name, user.password)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def serve(tenant_db: TenantDb, tmp_path: Path) -> Iterator[Callable[..., Served]]:
    started: list[Served] = []

    def start(**overrides: Any) -> Served:
        served = Served(tenant_db, tmp_path, **overrides)
        started.append(served)
        return served

    try:
        yield start
    finally:
        for served in started:
            served.close()


NEW_USER = ("acme_new", "acme-new-pw")


def test_sighup_broken_config_changes_nothing_good_config_applies(
    serve: Callable[..., Served],
) -> None:
    proxy = serve()
    acme = proxy.tenant("acme")
    initech = proxy.tenant("initech")
    try:
        with pytest.raises(errors.InsufficientPrivilege, match="denied_function"):
            acme.execute("SELECT pg_sleep(0)")

        # The new policy: a new acme user, initech removed, pg_sleep allowed.
        good = proxy.policy_dict(allowed_functions=["pg_sleep"])
        good["tenants"]["acme"]["users"][NEW_USER[0]] = {"password": NEW_USER[1]}
        del good["tenants"]["initech"]
        # The same changes plus one invalid value at the very end of the file.
        broken = yaml.safe_dump(good, sort_keys=False) + "audit: {queue_size: 0}\n"

        proxy.write(broken)
        proxy.reload_and_wait("reload failed")
        assert "audit.queue_size" in proxy.log()
        assert proxy.metric("tenantgate_config_reloads_total", outcome="failure") == 1
        assert proxy.metric("tenantgate_config_reloads_total", outcome="success") == 0
        # Nothing of it applied: the old policy serves, existing sessions included.
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            proxy.connect(*NEW_USER)
        assert initech.execute("SELECT count(*) FROM orders WHERE tenant_id = 'initech'").fetchone()
        with proxy.tenant("initech") as again:
            again.execute("SELECT 1")
        with pytest.raises(errors.InsufficientPrivilege, match="denied_function"):
            acme.execute("SELECT pg_sleep(0)")
        assert "initech" in proxy.tenant_labels()
        assert proxy.http("/readyz")[0] == 200

        # Not valid YAML at all: the same.
        proxy.write("tenants: [unterminated\n")
        proxy.reload_and_wait("reload failed")
        assert proxy.metric("tenantgate_config_reloads_total", outcome="failure") == 2
        initech.execute("SELECT 1")

        proxy.write(good)
        proxy.reload_and_wait("policy reloaded")
        assert proxy.metric("tenantgate_config_reloads_total", outcome="success") == 1
        # The removed tenant's open session was ended with a clear FATAL ...
        with pytest.raises(errors.AdminShutdown) as info:
            initech.execute("SELECT 1")
        assert info.value.sqlstate == "57P01"
        assert "removed from the policy" in str(info.value)
        # ... and it can no longer log in.
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            proxy.tenant("initech")
        # The new user logs in, as acme.
        with proxy.connect(*NEW_USER) as new:
            rows = new.execute("SELECT DISTINCT tenant_id FROM orders WHERE tenant_id = 'acme'")
            assert rows.fetchall() == [("acme",)]
        # The existing acme session uses the new policy from its next statement on.
        acme.execute("SELECT pg_sleep(0)")
        assert acme.execute("SELECT 1").fetchone() == (1,)
        assert proxy.tenant_labels() == {"acme", "globex", "unknown"}
    finally:
        acme.close()
        initech.close()
    proxy.signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0


def test_sighup_removed_user_session_ended(serve: Callable[..., Served]) -> None:
    first = serve()
    data = first.policy_dict()
    data["tenants"]["acme"]["users"][NEW_USER[0]] = {"password": NEW_USER[1]}
    first.write(data)
    first.reload_and_wait("policy reloaded")
    with first.connect(*NEW_USER) as new, first.tenant("acme") as old:
        del data["tenants"]["acme"]["users"][NEW_USER[0]]
        first.write(data)
        first.reload_and_wait("policy reloaded")
        with pytest.raises(errors.AdminShutdown, match="removed from the policy"):
            new.execute("SELECT 1")
        assert old.execute("SELECT 1").fetchone() == (1,)  # same tenant, still listed
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        first.connect(*NEW_USER)


def test_sighup_prepared_statements_stay_checked(serve: Callable[..., Served]) -> None:
    """A reload gives each session a new inspector, and the server keeps the
    session's prepared statements: every Bind of one is still checked (a new
    inspector that did not know the name let a Bind with another tenant's id run)."""
    proxy = serve(mode="enforce")
    sql = "SELECT count(*) FROM orders WHERE tenant_id = %s"
    with proxy.tenant("acme") as acme:
        own = acme.execute(sql, ("acme",), prepare=True).fetchone()
        assert own is not None
        proxy.write(proxy.policy_dict(mode="enforce", allowed_functions=["pg_sleep"]))
        proxy.reload_and_wait("policy reloaded")
        with pytest.raises(errors.InsufficientPrivilege, match="wrong_tenant_param"):
            acme.execute(sql, ("globex",), prepare=True)
        assert acme.execute(sql, ("acme",), prepare=True).fetchone() == own


@pytest.mark.slow
def test_sigterm_drains_open_transactions(
    serve: Callable[..., Served], clean_tenant_db: TenantDb
) -> None:
    grace = 3.0
    proxy = serve(limits={"shutdown_timeout_s": grace})
    committer = proxy.tenant("acme")
    idle = proxy.tenant("initech")
    lingering = RawClient("127.0.0.1", proxy.port)
    user = clean_tenant_db.user("globex")
    try:
        lingering.login(user.name, user.password)
        committer.execute("BEGIN")
        committer.execute(
            "INSERT INTO orders (tenant_id, item) VALUES (%s, %s)", ("acme", "drain-commit")
        )
        lingering.simple("BEGIN")
        lingering.simple("INSERT INTO orders (tenant_id, item) VALUES ('globex', 'drain-lost')")

        proxy.signal(signal.SIGTERM)
        sigterm_at = time.monotonic()
        # New connections are refused while draining (the listener is closed) ...
        wait_until(lambda: proxy.http("/readyz")[0] == 503, timeout=2, what="readyz 503")
        with pytest.raises(psycopg.OperationalError):
            proxy.tenant("acme")
        # ... but an open transaction may still finish.
        time.sleep(0.3)
        committer.execute("COMMIT")
        assert time.monotonic() - sigterm_at < grace
        # The idle session is not cut off while another transaction is still open.
        assert idle.execute("SELECT 1").fetchone() == (1,)

        # The session still in its transaction at the deadline is ended with 57P01.
        lingering.sock.settimeout(grace + 5)
        item = lingering.read()
        ended_after = time.monotonic() - sigterm_at
        assert item is not None
        assert item[0] == b"E"
        fields = error_fields(item[1])
        assert (fields["S"], fields["C"]) == ("FATAL", "57P01")
        assert "shutting down" in fields["M"]
        assert grace - 0.3 < ended_after < grace + 3
        assert lingering.closed_by_peer()
        with pytest.raises(errors.AdminShutdown):
            idle.execute("SELECT 1")
        assert proxy.proc.wait(10) == 0
    finally:
        committer.close()
        idle.close()
        lingering.close()
    with clean_tenant_db.connect() as conn:
        items = conn.execute(
            "SELECT item FROM orders WHERE item IN ('drain-commit', 'drain-lost')"
        ).fetchall()
    assert items == [("drain-commit",)]


def test_sigint_exits_as_soon_as_transactions_finish(
    serve: Callable[..., Served], clean_tenant_db: TenantDb
) -> None:
    proxy = serve(limits={"shutdown_timeout_s": 30})
    user = clean_tenant_db.user("acme")
    with RawClient("127.0.0.1", proxy.port) as client:
        client.login(user.name, user.password)
        client.simple("BEGIN")
        client.simple("INSERT INTO orders (tenant_id, item) VALUES ('acme', 'quick')")
        proxy.signal(signal.SIGINT)
        time.sleep(0.3)
        assert proxy.proc.poll() is None  # waiting for the transaction
        assert client.simple("COMMIT")[-1] == (b"Z", b"I")
        start = time.monotonic()
        item = client.read()  # ended right after the last transaction finished
        assert item is not None
        assert item[0] == b"E"
        assert error_fields(item[1])["C"] == "57P01"
        assert proxy.proc.wait(10) == 0
        assert time.monotonic() - start < 5  # well before the 30 s grace
    with clean_tenant_db.connect() as db:
        assert db.execute("SELECT count(*) FROM orders WHERE item = 'quick'").fetchone() == (1,)
