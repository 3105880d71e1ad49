"""Cancel through the proxy: proxy-made keys mapped to the upstream's, forwarded
only while the client has a statement running, never with a wrong key."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import asyncpg
import psycopg
import pytest
from proxy_helpers import (
    PROTOCOL_3_0,
    PROTOCOL_3_2,
    Proxy,
    RawClient,
    cancel_request,
    errors_of,
    query,
    rows_of,
    self_signed_cert,
    start_proxy,
    stop_when_idle,
)
from psycopg import errors

from support.db import TenantDb

pytestmark = pytest.mark.postgres

USER, PASSWORD = "acme_app", "acme-pw"
SLEEP = "SELECT pg_sleep(10)"


@pytest.fixture(scope="module")
def proxy(tenant_db: TenantDb) -> Iterator[Proxy]:
    running = start_proxy(tenant_db.policy("enforce"))
    try:
        yield running
    finally:
        stop_when_idle(running)


def later(delay: float, fn: Callable[[], object]) -> threading.Timer:
    timer = threading.Timer(delay, fn)
    timer.start()
    return timer


def _cancel_sleep(conn: psycopg.Connection[tuple[object, ...]], how: str) -> float:
    start = time.monotonic()
    timer = later(0.5, getattr(conn, how))
    try:
        with pytest.raises(errors.QueryCanceled):
            conn.execute(SLEEP)
    finally:
        timer.join()
    return time.monotonic() - start


def test_psycopg_cancel(proxy: Proxy) -> None:
    # Not conn.cancel(): the binary implementation holds the GIL inside the blocking
    # PQcancel, which deadlocks against this in-process proxy.  psql covers PQcancel.
    with psycopg.connect(proxy.dsn(USER, PASSWORD), autocommit=True) as conn:
        assert _cancel_sleep(conn, "cancel_safe") < 5
        assert conn.execute("SELECT 'next'").fetchone() == ("next",)


def test_psql_ctrl_c_cancels(proxy: Proxy) -> None:
    """psql sends the classic PQcancel from its SIGINT handler."""
    env = {**os.environ, "PGPASSWORD": PASSWORD, "PGCONNECT_TIMEOUT": "10"}
    command = [
        "psql",
        "-X",
        "-At",
        "-h",
        proxy.host,
        "-p",
        str(proxy.port),
        "-U",
        USER,
        "-d",
        "app",
        "-c",
        SLEEP,
    ]
    start = time.monotonic()
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as psql:
        time.sleep(1.0)
        psql.send_signal(signal.SIGINT)
        _, stderr = psql.communicate(timeout=20)
    assert time.monotonic() - start < 6
    assert "canceling statement due to user request" in stderr


def test_psycopg_cancel_protocol_3_2(proxy: Proxy) -> None:
    if psycopg.pq.version() < 180000:
        pytest.skip("libpq < 18 cannot request protocol 3.2")
    dsn = proxy.dsn(USER, PASSWORD, max_protocol_version="3.2")
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.full_protocol_version == 30002
        assert _cancel_sleep(conn, "cancel_safe") < 5


async def test_psycopg_async_cancel(proxy: Proxy) -> None:
    async with await psycopg.AsyncConnection.connect(
        proxy.dsn(USER, PASSWORD), autocommit=True
    ) as conn:
        task = asyncio.create_task(conn.execute(SLEEP))
        await asyncio.sleep(0.5)
        start = time.monotonic()
        await conn.cancel_safe()
        with pytest.raises(errors.QueryCanceled):
            await task
        assert time.monotonic() - start < 5
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_asyncpg_timeout_cancels(proxy: Proxy) -> None:
    conn = await asyncpg.connect(
        host=proxy.host, port=proxy.port, user=USER, password=PASSWORD, database="app", ssl=False
    )
    try:
        start = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval(SLEEP, timeout=0.5)
        assert time.monotonic() - start < 5
        assert await conn.fetchval("SELECT 'usable'") == "usable"
        # nothing running upstream any more
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1 AND state = 'active'", SLEEP
            )
            == 0
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("protocol", [PROTOCOL_3_0, PROTOCOL_3_2])
def test_raw_cancel_with_the_right_key(proxy: Proxy, protocol: int) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        login = raw.login(USER, PASSWORD, protocol=protocol)
        raw.send(query(SLEEP))
        time.sleep(0.3)
        with RawClient(proxy.host, proxy.port) as canceller:
            canceller.send(cancel_request(login.process_id, login.secret_key))
            assert canceller.closed_by_peer()
        start = time.monotonic()
        messages = raw.read_until_ready()
        assert time.monotonic() - start < 5
        assert [e["C"] for e in errors_of(messages)] == ["57014"]


def _wrong_keys(pid: int, key: bytes) -> list[tuple[int, bytes]]:
    flipped = bytes([key[0] ^ 1]) + key[1:]
    return [
        (pid, flipped),
        (pid, key[:-1]),  # too short
        (pid, key + b"\x00"),  # too long
        (pid ^ 1, key),  # another process id
        (pid, bytes(32)),
    ]


@pytest.mark.parametrize("protocol", [PROTOCOL_3_0, PROTOCOL_3_2])
def test_cancel_with_a_wrong_key_does_nothing(proxy: Proxy, protocol: int) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        login = raw.login(USER, PASSWORD, protocol=protocol)
        raw.send(query("SELECT pg_sleep(1.5), 'survived'"))
        time.sleep(0.3)
        for pid, key in _wrong_keys(login.process_id, login.secret_key):
            with RawClient(proxy.host, proxy.port) as canceller:
                canceller.send(cancel_request(pid, key))
                assert canceller.closed_by_peer()
        messages = raw.read_until_ready()
        assert errors_of(messages) == []
        assert rows_of(messages) == [["", "survived"]]


def test_cancel_while_idle_does_not_hit_the_next_statement(proxy: Proxy) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        login = raw.login(USER, PASSWORD)
        with RawClient(proxy.host, proxy.port) as canceller:
            canceller.send(cancel_request(login.process_id, login.secret_key))
            assert canceller.closed_by_peer()
        time.sleep(0.3)
        messages = raw.simple("SELECT pg_sleep(0.5), 'not cancelled'")
        assert errors_of(messages) == []
        assert rows_of(messages) == [["", "not cancelled"]]


def test_psycopg_cancel_while_idle(proxy: Proxy) -> None:
    with psycopg.connect(proxy.dsn(USER, PASSWORD), autocommit=True) as conn:
        conn.cancel_safe()
        conn.cancel_safe()
        time.sleep(0.2)
        assert conn.execute("SELECT pg_sleep(0.3), 1").fetchone() == ("", 1)


def test_cancel_other_session_key_does_not_cross(proxy: Proxy) -> None:
    """One client's key never cancels another client's statement."""
    with RawClient(proxy.host, proxy.port) as victim, RawClient(proxy.host, proxy.port) as other:
        victim.login(USER, PASSWORD)
        mine = other.login("globex_app", "globex-pw")
        victim.send(query("SELECT pg_sleep(1), 'victim ok'"))
        time.sleep(0.2)
        with RawClient(proxy.host, proxy.port) as canceller:
            canceller.send(cancel_request(mine.process_id, mine.secret_key))
            assert canceller.closed_by_peer()
        messages = victim.read_until_ready()
        assert rows_of(messages) == [["", "victim ok"]]


@pytest.fixture(scope="module")
def tls_proxy(tenant_db: TenantDb, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    cert, key = self_signed_cert(tmp_path_factory.mktemp("cancel-tls"))
    tls = {"cert": str(cert), "key": str(key), "require": True}
    running = start_proxy(tenant_db.policy("enforce", listen={"tls": tls}))
    running.cert = cert  # type: ignore[attr-defined]
    try:
        yield running
    finally:
        stop_when_idle(running)


def test_cancel_over_tls(tls_proxy: Proxy) -> None:
    """libpq >= 17 sends its CancelRequest over TLS when the connection used TLS."""
    cert: Path = tls_proxy.cert  # type: ignore[attr-defined]
    dsn = tls_proxy.dsn(USER, PASSWORD, sslrootcert=str(cert)).replace(
        "sslmode=disable", "sslmode=verify-ca"
    )
    with psycopg.connect(dsn, autocommit=True) as conn:
        assert conn.pgconn.ssl_in_use
        assert _cancel_sleep(conn, "cancel_safe") < 5
        assert conn.execute("SELECT 2").fetchone() == (2,)
