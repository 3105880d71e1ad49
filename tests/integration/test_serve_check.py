"""``tenantgate serve`` runs the database isolation check before it listens.

In rls/both mode ``serve`` refuses to start (exit 1, "refusing to start") when
the check finds errors, unless ``--skip-check`` (then it logs "STARTING
ANYWAY"); enforce mode never runs the check.  Also the exit codes of
``tenantgate check``: 0 sound, 1 unsound, 2 upstream unreachable.

The unsound database is a scratch database in the session cluster with the
same tables as ``app``, granted to the same upstream role, but no RLS at all.
Every ``serve`` runs as a real subprocess of the installed console script.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from support.db import TenantDb
from tenantgate.cluster import Cluster

pytestmark = pytest.mark.postgres

TENANTGATE = Path(sys.executable).parent / "tenantgate"
UNSOUND_DB = "serve_check_unsound"
START_TIMEOUT = 20.0

_UNSOUND_SCHEMA = """
CREATE SCHEMA billing;
CREATE TABLE orders (id bigserial PRIMARY KEY, tenant_id text NOT NULL, item text,
    amount numeric, secret text);
CREATE TABLE customers (id bigserial PRIMARY KEY, tenant_id text NOT NULL, name text, email text);
CREATE TABLE billing.invoices (id bigserial PRIMARY KEY, tenant_id text NOT NULL,
    order_id bigint, total numeric);
CREATE TABLE plans (id int PRIMARY KEY, name text, price numeric);
GRANT USAGE ON SCHEMA public, billing TO {app};
GRANT SELECT, INSERT, UPDATE, DELETE ON orders, customers, billing.invoices TO {app};
GRANT SELECT ON plans TO {app};
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def unsound_db(pg: Cluster, tenant_db: TenantDb) -> Iterator[str]:
    """A database with the ``app`` tables and grants but no row-level security."""
    drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(UNSOUND_DB))
    with psycopg.connect(pg.make_dsn(), autocommit=True) as conn:
        conn.execute(drop)
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(UNSOUND_DB)))
    with psycopg.connect(pg.make_dsn(database=UNSOUND_DB), autocommit=True) as conn:
        conn.execute(sql.SQL(_UNSOUND_SCHEMA).format(app=sql.Identifier(tenant_db.app_user)))
    try:
        yield UNSOUND_DB
    finally:
        with psycopg.connect(pg.make_dsn(), autocommit=True) as conn:
            conn.execute(drop)


@dataclass
class Config:
    path: Path
    port: int
    database: str


def _write_config(
    tenant_db: TenantDb, directory: Path, mode: str = "both", **overrides: Any
) -> Config:
    port = _free_port()
    text = tenant_db.policy_yaml(mode, port, metrics_port=_free_port(), **overrides)
    path = directory / f"policy-{mode}-{port}.yaml"
    path.write_text(text, encoding="utf-8")
    database = overrides.get("upstream", {}).get("database", tenant_db.database)
    return Config(path, port, database)


class Serve:
    """``tenantgate serve`` in a subprocess; stderr (the log) goes to a file."""

    def __init__(self, config: Config, *extra: str) -> None:
        self.config = config
        self.log_path = config.path.with_suffix(".log")
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(TENANTGATE), "serve", "--config", str(config.path), *extra],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log}")
            try:
                with socket.create_connection(("127.0.0.1", self.config.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"serve did not listen on {self.config.port} in {timeout}s:\n{self.log}")

    def query_one(self, tenant_db: TenantDb, query: str) -> tuple[Any, ...] | None:
        user = tenant_db.user("acme")
        dsn = (
            f"host=127.0.0.1 port={self.config.port} dbname={self.config.database} "
            f"user={user.name} password={user.password} sslmode=disable connect_timeout=10"
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            return conn.execute(query).fetchone()

    def terminate(self, timeout: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def serve() -> Iterator[list[Serve]]:
    """Collects the Serve processes a test starts and kills any left running."""
    started: list[Serve] = []
    yield started
    for item in started:
        item.close()


def _check(config: Config) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(TENANTGATE), "check", "--config", str(config.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- serve ----------------------------------------------------------------------------


def test_serve_starts_on_a_sound_database(
    tenant_db: TenantDb, tmp_path: Path, serve: list[Serve]
) -> None:
    proc = Serve(_write_config(tenant_db, tmp_path))
    serve.append(proc)
    proc.wait_listening()
    assert proc.query_one(tenant_db, "SELECT current_setting('app.tenant_id')") == ("acme",)
    assert proc.terminate() == 0
    assert "refusing to start" not in proc.log
    assert "STARTING ANYWAY" not in proc.log


def test_serve_refuses_an_unsound_database(
    tenant_db: TenantDb, unsound_db: str, tmp_path: Path, serve: list[Serve]
) -> None:
    config = _write_config(tenant_db, tmp_path, upstream={"database": unsound_db})
    proc = Serve(config)
    serve.append(proc)
    assert proc.proc.wait(timeout=15) == 1
    log = proc.log
    assert "refusing to start in both mode" in log, log
    assert "NOT safe for rls mode" in log, log
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", config.port), timeout=1):
        pass


def test_serve_refuses_an_unsound_database_in_rls_mode(
    tenant_db: TenantDb, unsound_db: str, tmp_path: Path, serve: list[Serve]
) -> None:
    config = _write_config(tenant_db, tmp_path, "rls", upstream={"database": unsound_db})
    proc = Serve(config)
    serve.append(proc)
    assert proc.proc.wait(timeout=15) == 1
    assert "refusing to start in rls mode" in proc.log, proc.log


def test_serve_skip_check_starts_anyway(
    tenant_db: TenantDb, unsound_db: str, tmp_path: Path, serve: list[Serve]
) -> None:
    config = _write_config(tenant_db, tmp_path, upstream={"database": unsound_db})
    proc = Serve(config, "--skip-check")
    serve.append(proc)
    proc.wait_listening()
    assert proc.query_one(tenant_db, "SELECT 1") == (1,)
    assert proc.terminate() == 0
    log = proc.log
    assert "STARTING ANYWAY (--skip-check)" in log, log
    assert "NOT sound" in log
    assert "refusing to start" not in log


def test_enforce_mode_never_runs_the_check(
    tenant_db: TenantDb, unsound_db: str, tmp_path: Path, serve: list[Serve]
) -> None:
    config = _write_config(tenant_db, tmp_path, "enforce", upstream={"database": unsound_db})
    proc = Serve(config)
    serve.append(proc)
    proc.wait_listening()
    assert proc.query_one(tenant_db, "SELECT 1") == (1,)
    assert proc.terminate() == 0
    log = proc.log
    assert "refusing to start" not in log, log
    assert "STARTING ANYWAY" not in log
    assert "isolation setup" not in log


def test_serve_starts_when_the_database_is_unreachable_for_the_check(
    tenant_db: TenantDb, tmp_path: Path, serve: list[Serve]
) -> None:
    """A down database is not an unsound one: serve warns, starts, fails closed per session."""
    config = _write_config(
        tenant_db, tmp_path, upstream={"port": _free_port(), "connect_timeout_s": 2}
    )
    proc = Serve(config)
    serve.append(proc)
    proc.wait_listening()
    with pytest.raises(psycopg.OperationalError, match="could not connect to the upstream"):
        proc.query_one(tenant_db, "SELECT 1")
    assert proc.terminate() == 0
    assert "could not check the database's isolation setup" in proc.log, proc.log


# --- check ----------------------------------------------------------------------------


def test_check_exit_code_sound(tenant_db: TenantDb, tmp_path: Path) -> None:
    done = _check(_write_config(tenant_db, tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "the database is sound for rls mode" in done.stdout


def test_check_exit_code_unsound(tenant_db: TenantDb, unsound_db: str, tmp_path: Path) -> None:
    done = _check(_write_config(tenant_db, tmp_path, upstream={"database": unsound_db}))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "NOT safe for rls mode" in done.stdout


def test_check_exit_code_unreachable(tenant_db: TenantDb, tmp_path: Path) -> None:
    config = _write_config(
        tenant_db, tmp_path, upstream={"port": _free_port(), "connect_timeout_s": 2}
    )
    done = _check(config)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "cannot check the database" in done.stderr
    assert tenant_db.app_password not in done.stdout + done.stderr
