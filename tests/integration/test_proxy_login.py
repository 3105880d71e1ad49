"""Login through the proxy: every driver, SCRAM against plaintext and verifier
entries, refused startups, and the first-packet dance (SSL/GSSENC/3.2/negotiation).

Statements go through the :func:`proxy_helpers.allow_all` inspector: these
tests are about the handshake, not about the policy.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator

import asyncpg
import pg8000.native
import psycopg
import pytest
from proxy_helpers import (
    PROTOCOL_3_0,
    PROTOCOL_3_2,
    Proxy,
    RawClient,
    ServerError,
    error_fields,
    gssenc_request,
    rows_of,
    ssl_request,
    start_proxy,
    startup_packet,
    stop_when_idle,
)

from support.db import TenantDb, TenantUser

pytestmark = pytest.mark.postgres

LOGINS = ("acme_app", "acme_scram")  # plaintext policy entry, SCRAM verifier entry


@pytest.fixture(scope="module")
def proxy(tenant_db: TenantDb) -> Iterator[Proxy]:
    running = start_proxy(tenant_db.policy())
    try:
        yield running
    finally:
        stop_when_idle(running)


@pytest.fixture(params=LOGINS)
def login(request: pytest.FixtureRequest, tenant_db: TenantDb) -> TenantUser:
    return tenant_db.users[request.param]


def raw_login_error(proxy: Proxy, user: str, password: str, **params: str) -> dict[str, str]:
    with RawClient(proxy.host, proxy.port) as raw:
        with pytest.raises(ServerError) as info:
            raw.login(user, password, **params)  # type: ignore[arg-type]
        assert raw.closed_by_peer()
    return info.value.fields


def raw_startup_error(
    proxy: Proxy, params: dict[str, str], protocol: int = PROTOCOL_3_0
) -> dict[str, str]:
    """Send a startup packet; the FATAL ErrorResponse the proxy answers with."""
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(startup_packet(params, protocol))
        kind, payload = raw.read() or (b"", b"")
        assert kind == b"E", (kind, payload)
        assert raw.closed_by_peer()
    return error_fields(payload)


# --- drivers ------------------------------------------------------------------------


def test_psycopg_sync_login(proxy: Proxy, login: TenantUser) -> None:
    with psycopg.connect(proxy.dsn(login.name, login.password)) as conn:
        row = conn.execute("SELECT current_user, current_database(), 40 + %s", (2,)).fetchone()
        assert row == ("app_tenant", "app", 42)
        assert conn.info.parameter_status("client_encoding") == "UTF8"
        assert conn.info.backend_pid != 0


async def test_psycopg_async_login(proxy: Proxy, login: TenantUser) -> None:
    async with await psycopg.AsyncConnection.connect(proxy.dsn(login.name, login.password)) as conn:
        cur = await conn.execute("SELECT current_user, %s::text", ("async",))
        assert await cur.fetchone() == ("app_tenant", "async")


async def test_asyncpg_login(proxy: Proxy, login: TenantUser) -> None:
    conn = await asyncpg.connect(
        host=proxy.host,
        port=proxy.port,
        user=login.name,
        password=login.password,
        database="app",
        ssl=False,
    )
    try:
        assert await conn.fetchval("SELECT current_user") == "app_tenant"
        assert await conn.fetchval("SELECT $1::int * 2", 21) == 42
    finally:
        await conn.close()


def test_pg8000_login(proxy: Proxy, login: TenantUser) -> None:
    conn = pg8000.native.Connection(
        login.name, host=proxy.host, port=proxy.port, database="app", password=login.password
    )
    try:
        assert conn.run("SELECT current_user, :x::int + 1", x=41) == [["app_tenant", 42]]
    finally:
        conn.close()


def test_psql_login(proxy: Proxy, login: TenantUser) -> None:
    env = {**os.environ, "PGPASSWORD": login.password, "PGCONNECT_TIMEOUT": "10"}
    result = subprocess.run(
        [
            "psql",
            "-X",
            "-At",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            proxy.host,
            "-p",
            str(proxy.port),
            "-U",
            login.name,
            "-d",
            "app",
            "-c",
            "SELECT current_user",
            "-c",
            "SELECT count(*) FROM generate_series(1, 10)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["app_tenant", "10"]


def test_psql_wrong_password(proxy: Proxy, tenant_db: TenantDb) -> None:
    env = {**os.environ, "PGPASSWORD": "nope", "PGCONNECT_TIMEOUT": "10"}
    result = subprocess.run(
        [
            "psql",
            "-X",
            "-At",
            "-h",
            proxy.host,
            "-p",
            str(proxy.port),
            "-U",
            "acme_app",
            "-d",
            "app",
            "-c",
            "SELECT 1",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert 'password authentication failed for user "acme_app"' in result.stderr


# --- refused logins -------------------------------------------------------------------


def test_wrong_password_and_unknown_user_look_the_same(proxy: Proxy) -> None:
    wrong = raw_login_error(proxy, "acme_app", "not-the-password")
    unknown = raw_login_error(proxy, "nobody_here", "whatever")
    assert wrong["S"] == unknown["S"] == "FATAL"
    assert wrong["C"] == unknown["C"] == "28P01"
    assert wrong["M"] == 'password authentication failed for user "acme_app"'
    assert unknown["M"] == 'password authentication failed for user "nobody_here"'
    assert set(wrong) == set(unknown)


def test_scram_user_wrong_password(proxy: Proxy) -> None:
    assert raw_login_error(proxy, "acme_scram", "acme-pw")["C"] == "28P01"


async def test_asyncpg_wrong_password_sqlstate(proxy: Proxy) -> None:
    for user in ("acme_app", "ghost"):
        with pytest.raises(asyncpg.InvalidPasswordError) as info:
            await asyncpg.connect(
                host=proxy.host,
                port=proxy.port,
                user=user,
                password="bad",
                database="app",
                ssl=False,
            )
        assert info.value.sqlstate == "28P01"
        assert str(info.value) == f'password authentication failed for user "{user}"'


def test_psycopg_wrong_password(proxy: Proxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(proxy.dsn("acme_app", "bad"))


def test_pg8000_wrong_password(proxy: Proxy) -> None:
    with pytest.raises(pg8000.native.DatabaseError) as info:
        pg8000.native.Connection(
            "acme_app", host=proxy.host, port=proxy.port, database="app", password="bad"
        )
    assert info.value.args[0]["C"] == "28P01"


def test_other_database_refused(proxy: Proxy) -> None:
    fields = raw_login_error(proxy, "acme_app", "acme-pw", database="postgres")
    assert (fields["S"], fields["C"]) == ("FATAL", "3D000")
    # before authentication: an unknown user learns nothing either way
    fields = raw_startup_error(proxy, {"user": "acme_app", "database": "template1"})
    assert fields["C"] == "3D000"


async def test_asyncpg_other_database(proxy: Proxy) -> None:
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(
            host=proxy.host,
            port=proxy.port,
            user="acme_app",
            password="acme-pw",
            database="postgres",
            ssl=False,
        )


def test_no_database_defaults_to_user_name(proxy: Proxy) -> None:
    fields = raw_startup_error(proxy, {"user": "acme_app"})
    assert fields["C"] == "3D000"
    assert "acme_app" in fields["M"]


@pytest.mark.parametrize("value", ["database", "true", "on", "1"])
def test_replication_refused(proxy: Proxy, value: str) -> None:
    fields = raw_startup_error(proxy, {"user": "acme_app", "database": "app", "replication": value})
    assert fields["S"] == "FATAL"
    assert fields["M"].startswith("tenantgate:")
    assert "replication" in fields["M"]


def test_psycopg_replication_refused(proxy: Proxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="replication"):
        psycopg.connect(proxy.dsn("acme_app", "acme-pw", replication="database"))


def test_options_refused(proxy: Proxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="startup options are not forwarded"):
        psycopg.connect(proxy.dsn("acme_app", "acme-pw", options="'-c row_security=off'"))
    fields = raw_startup_error(
        proxy, {"user": "acme_app", "database": "app", "options": "-c search_path=evil"}
    )
    assert (fields["S"], fields["C"]) == ("FATAL", "0A000")


def test_latin1_client_encoding_refused(proxy: Proxy) -> None:
    with pytest.raises(psycopg.OperationalError, match="client_encoding"):
        psycopg.connect(proxy.dsn("acme_app", "acme-pw", client_encoding="LATIN1"))
    fields = raw_startup_error(
        proxy, {"user": "acme_app", "database": "app", "client_encoding": "LATIN1"}
    )
    assert (fields["S"], fields["C"]) == ("FATAL", "22023")


def test_utf8_client_encoding_accepted(proxy: Proxy) -> None:
    with psycopg.connect(proxy.dsn("acme_app", "acme-pw", client_encoding="utf-8")) as conn:
        assert conn.execute("SHOW client_encoding").fetchone() == ("UTF8",)


def test_arbitrary_startup_settings_not_forwarded(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        login = raw.login(
            "acme_app",
            "acme-pw",
            extra={
                "search_path": "evil",
                "row_security": "off",
                "application_name": "raw-client",
                "TimeZone": "Asia/Tokyo",
            },
        )
        assert login.parameters["application_name"] == "raw-client"
        assert login.parameters["TimeZone"] == "Asia/Tokyo"
        assert rows_of(raw.simple("SHOW search_path")) == [['"$user", public']]
        assert rows_of(raw.simple("SHOW row_security")) == [["on"]]
        assert rows_of(raw.simple("SHOW application_name")) == [["raw-client"]]


# --- first packets --------------------------------------------------------------------


def test_gssenc_answered_n_then_startup(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(gssenc_request())
        assert raw.recv_byte() == b"N"
        raw.login("acme_app", "acme-pw")
        assert rows_of(raw.simple("SELECT 1")) == [["1"]]


def test_ssl_request_without_tls_answered_n(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(ssl_request())
        assert raw.recv_byte() == b"N"
        raw.login("acme_app", "acme-pw")
        assert rows_of(raw.simple("SELECT 'plain'")) == [["plain"]]


def test_psycopg_sslmode_prefer_falls_back(proxy: Proxy) -> None:
    dsn = proxy.dsn("acme_app", "acme-pw").replace("sslmode=disable", "sslmode=prefer")
    with psycopg.connect(dsn) as conn:
        assert not conn.pgconn.ssl_in_use
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_psycopg_gssencmode_prefer(proxy: Proxy) -> None:
    with psycopg.connect(proxy.dsn("acme_app", "acme-pw", gssencmode="prefer")) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.parametrize(("protocol", "key_length"), [(PROTOCOL_3_0, 4), (PROTOCOL_3_2, 32)])
def test_cancel_key_length_by_protocol(proxy: Proxy, protocol: int, key_length: int) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        login = raw.login("acme_app", "acme-pw", protocol=protocol)
        assert len(login.secret_key) == key_length
        assert login.process_id > 0
        assert not any(kind == b"v" for kind, _ in login.messages)
        assert rows_of(raw.simple("SELECT 32")) == [["32"]]


def test_negotiate_protocol_version(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        login = raw.login(
            "acme_app", "acme-pw", protocol=(3 << 16) | 9999, extra={"_pq_.test": "x"}
        )
        negotiations = [payload for kind, payload in login.messages if kind == b"v"]
        assert len(negotiations) == 1
        newest, count = struct.unpack_from("!ii", negotiations[0])
        names = [n.decode() for n in negotiations[0][8:].split(b"\x00") if n]
        assert newest == PROTOCOL_3_2
        assert (count, names) == (1, ["_pq_.test"])
        # 'v' comes before authentication, as PostgreSQL sends it
        assert login.messages[0][0] == b"v"
        assert len(login.secret_key) == 32
        assert rows_of(raw.simple("SELECT 'negotiated'")) == [["negotiated"]]


def test_negotiate_unknown_option_on_3_0(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        login = raw.login("acme_app", "acme-pw", extra={"_pq_.other": "1"})
        negotiations = [payload for kind, payload in login.messages if kind == b"v"]
        assert len(negotiations) == 1
        newest, count = struct.unpack_from("!ii", negotiations[0])
        assert (newest, count) == (PROTOCOL_3_0, 1)


def test_psycopg_protocol_3_2(proxy: Proxy) -> None:
    if psycopg.pq.version() < 180000:
        pytest.skip("libpq < 18 cannot request protocol 3.2")
    with psycopg.connect(proxy.dsn("acme_app", "acme-pw", max_protocol_version="3.2")) as conn:
        assert conn.pgconn.full_protocol_version == 30002
        assert conn.execute("SELECT 'three-two'").fetchone() == ("three-two",)


def test_unsupported_major_protocol(proxy: Proxy) -> None:
    fields = raw_startup_error(proxy, {"user": "acme_app", "database": "app"}, protocol=2 << 16)
    assert fields["S"] == "FATAL"
    assert fields["C"] == "08P01"
