"""TLS termination at the proxy: require, refused plaintext, no bytes smuggled
before the handshake (CVE-2021-23222 class), SCRAM-SHA-256-PLUS channel binding.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from proxy_helpers import (
    Proxy,
    RawClient,
    ServerError,
    error_fields,
    rows_of,
    self_signed_cert,
    ssl_request,
    start_proxy,
    startup_packet,
    stop_when_idle,
)

from support.db import TenantDb

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"))


def _tls_proxy(tenant_db: TenantDb, cert: tuple[Path, Path], require: bool) -> Proxy:
    tls = {"cert": str(cert[0]), "key": str(cert[1]), "require": require}
    return start_proxy(tenant_db.policy(listen={"tls": tls}))


@pytest.fixture(scope="module")
def tls_proxy(tenant_db: TenantDb, cert: tuple[Path, Path]) -> Iterator[Proxy]:
    running = _tls_proxy(tenant_db, cert, require=True)
    try:
        yield running
    finally:
        stop_when_idle(running)


@pytest.fixture(scope="module")
def optional_tls_proxy(tenant_db: TenantDb, cert: tuple[Path, Path]) -> Iterator[Proxy]:
    running = _tls_proxy(tenant_db, cert, require=False)
    try:
        yield running
    finally:
        stop_when_idle(running)


def tls_dsn(proxy: Proxy, sslmode: str, **extra: str) -> str:
    return proxy.dsn("acme_app", "acme-pw", **extra).replace(
        "sslmode=disable", f"sslmode={sslmode}"
    )


def client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    context.check_hostname = False
    return context


@pytest.mark.parametrize("sslmode", ["require", "verify-ca", "verify-full"])
def test_psycopg_tls(tls_proxy: Proxy, cert: tuple[Path, Path], sslmode: str) -> None:
    with psycopg.connect(tls_dsn(tls_proxy, sslmode, sslrootcert=str(cert[0]))) as conn:
        assert conn.pgconn.ssl_in_use
        assert conn.execute("SELECT current_user").fetchone() == ("app_tenant",)


def test_plaintext_refused_when_tls_required(tls_proxy: Proxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="requires TLS"):
        psycopg.connect(tls_dsn(tls_proxy, "disable"))
    with RawClient(tls_proxy.host, tls_proxy.port) as raw:
        raw.send(startup_packet({"user": "acme_app", "database": "app"}))
        kind, payload = raw.read() or (b"", b"")
        assert kind == b"E"
        assert error_fields(payload)["S"] == "FATAL"
        assert raw.closed_by_peer()


def test_bytes_pipelined_after_ssl_request_refused(tls_proxy: Proxy) -> None:
    with RawClient(tls_proxy.host, tls_proxy.port) as raw:
        raw.send(ssl_request() + startup_packet({"user": "acme_app", "database": "app"}))
        answer = raw.recv_byte()
        assert answer != b"S"  # never start TLS with plaintext bytes already buffered
        assert raw.closed_by_peer()


def test_ssl_request_twice_refused(tls_proxy: Proxy, cert: tuple[Path, Path]) -> None:
    with RawClient(tls_proxy.host, tls_proxy.port) as raw:
        raw.send(ssl_request())
        assert raw.recv_byte() == b"S"
        raw.start_tls(client_context(cert[0]))
        raw.send(ssl_request())
        assert raw.closed_by_peer()


def test_raw_tls_login(tls_proxy: Proxy, cert: tuple[Path, Path]) -> None:
    with RawClient(tls_proxy.host, tls_proxy.port) as raw:
        raw.send(ssl_request())
        assert raw.recv_byte() == b"S"
        raw.start_tls(client_context(cert[0]))
        login = raw.login("acme_scram", "acme-scram-pw")
        sasl = next(p for k, p in login.messages if k == b"R" and p[:4] == b"\x00\x00\x00\x0a")
        assert b"SCRAM-SHA-256-PLUS\x00" in sasl  # offered over TLS
        assert rows_of(raw.simple("SELECT 'over tls'")) == [["over tls"]]


def test_channel_binding_required(tls_proxy: Proxy) -> None:
    """libpq uses SCRAM-SHA-256-PLUS with tls-server-end-point; the proxy must verify it."""
    with psycopg.connect(tls_dsn(tls_proxy, "require", channel_binding="require")) as conn:
        assert conn.execute("SELECT 'bound'").fetchone() == ("bound",)
    with psycopg.connect(
        tls_proxy.dsn("acme_scram", "acme-scram-pw", channel_binding="require").replace(
            "sslmode=disable", "sslmode=require"
        )
    ) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def _tls_raw(proxy: Proxy, cert: Path) -> RawClient:
    raw = RawClient(proxy.host, proxy.port)
    raw.send(ssl_request())
    assert raw.recv_byte() == b"S"
    raw.start_tls(client_context(cert))
    return raw


def test_raw_scram_plus(tls_proxy: Proxy, cert: tuple[Path, Path]) -> None:
    with _tls_raw(tls_proxy, cert[0]) as raw:
        assert isinstance(raw.sock, ssl.SSLSocket)
        binding: tuple[str, bytes | ssl.SSLSocket] = ("tls-server-end-point", raw.sock)
        raw.login("acme_app", "acme-pw", mechanism="SCRAM-SHA-256-PLUS", channel_binding=binding)
        assert rows_of(raw.simple("SELECT 'plus'")) == [["plus"]]


def test_raw_scram_plus_wrong_binding_refused(tls_proxy: Proxy, cert: tuple[Path, Path]) -> None:
    with _tls_raw(tls_proxy, cert[0]) as raw:
        binding: tuple[str, bytes | ssl.SSLSocket] = ("tls-server-end-point", b"\x00" * 32)
        with pytest.raises(ServerError) as info:
            raw.login(
                "acme_app", "acme-pw", mechanism="SCRAM-SHA-256-PLUS", channel_binding=binding
            )
        assert (info.value.fields["S"], info.value.sqlstate) == ("FATAL", "28P01")
        assert raw.closed_by_peer()


def test_channel_binding_wrong_password(tls_proxy: Proxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            tls_proxy.dsn("acme_app", "bad", channel_binding="require").replace(
                "sslmode=disable", "sslmode=require"
            )
        )


async def test_asyncpg_tls(tls_proxy: Proxy, cert: tuple[Path, Path]) -> None:
    conn = await asyncpg.connect(
        host=tls_proxy.host,
        port=tls_proxy.port,
        user="globex_app",
        password="globex-pw",
        database="app",
        ssl=client_context(cert[0]),
    )
    try:
        assert await conn.fetchval("SELECT $1::text", "tls") == "tls"
    finally:
        await conn.close()


def test_optional_tls(optional_tls_proxy: Proxy) -> None:
    with psycopg.connect(tls_dsn(optional_tls_proxy, "prefer")) as conn:
        assert conn.pgconn.ssl_in_use
    with psycopg.connect(tls_dsn(optional_tls_proxy, "disable")) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)
    # SCRAM-SHA-256-PLUS is only offered over TLS
    with pytest.raises(psycopg.OperationalError, match="channel binding"):
        psycopg.connect(tls_dsn(optional_tls_proxy, "disable", channel_binding="require"))
