"""Hostile and broken peers: malformed and oversized packets, stalls, timeouts,
an unreachable or dying upstream.  Each gets a clean FATAL or a close, and the
proxy keeps serving everybody else (a heartbeat client runs throughout).
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from proxy_helpers import (
    Proxy,
    RawClient,
    RssSampler,
    ServerError,
    error_fields,
    first_packet,
    msg,
    open_connections,
    proxy_server,
    query,
    rows_of,
    start_proxy,
    startup_packet,
    stop_when_idle,
    wait_for,
)
from psycopg import errors

from support.db import TenantDb
from support.loopguard import LOOP_GUARD

pytestmark = pytest.mark.postgres

USER, PASSWORD = "acme_app", "acme-pw"
MB = 1024 * 1024
MAX_MESSAGE = MB


@pytest.fixture(scope="module")
def proxy(tenant_db: TenantDb) -> Iterator[Proxy]:
    policy = tenant_db.policy(
        "enforce",
        limits={"max_message_bytes": MAX_MESSAGE, "handshake_timeout_s": 2},
        tenants={"initech": {"limits": {"max_connections": 1}}},
    )
    running = start_proxy(policy)
    try:
        yield running
    finally:
        stop_when_idle(running)


class Heartbeat:
    """A well-behaved client querying in a loop in a thread."""

    def __init__(self, proxy: Proxy) -> None:
        self.count = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._conn = psycopg.connect(proxy.dsn("globex_app", "globex-pw"), autocommit=True)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                row = self._conn.execute("SELECT %s::int + 1", (self.count,)).fetchone()
                assert row == (self.count + 1,)
                self.count += 1
            except Exception as exc:  # any failure is the test's failure
                self.failures.append(repr(exc))
                return
            time.sleep(0.005)

    def beats_during(self, seconds: float = 0.3) -> int:
        before = self.count
        time.sleep(seconds)
        return self.count - before

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._conn.close()


@pytest.fixture
def heartbeat(proxy: Proxy) -> Iterator[Heartbeat]:
    beat = Heartbeat(proxy)
    try:
        yield beat
        assert beat.beats_during() > 0, "the proxy stalled for other clients"
        assert beat.failures == []
    finally:
        beat.stop()
    with psycopg.connect(proxy.dsn(USER, PASSWORD)) as conn:  # and it is still up
        assert conn.execute("SELECT 'alive'").fetchone() == ("alive",)


def logged_in(proxy: Proxy) -> RawClient:
    raw = RawClient(proxy.host, proxy.port)
    raw.login(USER, PASSWORD)
    return raw


def fatal_then_close(raw: RawClient, sqlstate: str = "08P01", timeout: float = 5) -> dict[str, str]:
    """The next message is a FATAL ErrorResponse with ``sqlstate``; then EOF."""
    raw.sock.settimeout(timeout)
    item = raw.read()
    assert item is not None, "closed without an ErrorResponse"
    kind, payload = item
    assert kind == b"E", (kind, payload[:200])
    fields = error_fields(payload)
    assert (fields["S"], fields["C"]) == ("FATAL", sqlstate), fields
    assert fields["M"].startswith("tenantgate:")
    assert "Traceback" not in payload.decode(errors="replace")
    assert raw.closed_by_peer(timeout)
    return fields


# --- first packet ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(struct.pack("!I", 0x7FFFFFFF) + b"\x00\x03\x00\x00", id="2GiB-length"),
        pytest.param(struct.pack("!I", 0xFFFFFFFF), id="4GiB-length"),
        pytest.param(struct.pack("!I", 3), id="length-below-minimum"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: proxy\r\n\r\n", id="http"),
        pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), id="tls-hello"),
        pytest.param(first_packet(struct.pack("!I", 1234)), id="unknown-code"),
        pytest.param(first_packet(struct.pack("!I", 3 << 16) + b"user\x00acme"), id="unterminated"),
        pytest.param(
            first_packet(struct.pack("!I", 3 << 16) + b"user\x00a\x00user\x00b\x00\x00"),
            id="duplicate-parameter",
        ),
        pytest.param(
            first_packet(struct.pack("!I", 3 << 16) + b"user\x00\xff\xfe\x00\x00"), id="not-utf8"
        ),
        pytest.param(first_packet(struct.pack("!Ii", 80877102, 1) + b"\x01"), id="short-cancel"),
    ],
)
def test_bad_first_packet(proxy: Proxy, heartbeat: Heartbeat, data: bytes) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(data)
        start = time.monotonic()
        assert raw.closed_by_peer(timeout=5)
        assert time.monotonic() - start < 1.5  # refused at once, not by the handshake timeout


def test_oversized_startup_packet(proxy: Proxy, heartbeat: Heartbeat) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(startup_packet({"user": USER, "database": "app", "application_name": "x" * 11000}))
        fatal_then_close(raw)
    with RawClient(proxy.host, proxy.port) as raw:  # just under the limit is fine
        login = raw.login(USER, PASSWORD, extra={"application_name": "y" * 60})
        assert login.parameters["application_name"].startswith("yyy")


def test_truncated_startup_then_close(proxy: Proxy, heartbeat: Heartbeat) -> None:
    for cut in (1, 3, 8, 20):
        with RawClient(proxy.host, proxy.port) as raw:
            raw.send(startup_packet({"user": USER, "database": "app"})[:cut])
    assert wait_for(lambda: open_connections(proxy) <= 1)  # the heartbeat


def test_handshake_timeout_silent_client(proxy: Proxy, heartbeat: Heartbeat) -> None:
    with RawClient(proxy.host, proxy.port) as silent, RawClient(proxy.host, proxy.port) as half:
        half.send(startup_packet({"user": USER, "database": "app"})[:10])
        start = time.monotonic()
        for raw in (silent, half):
            fields = fatal_then_close(raw, timeout=10)
            assert "handshake" in fields["M"]
        assert 1.5 < time.monotonic() - start < 6


def test_handshake_timeout_during_scram(proxy: Proxy, heartbeat: Heartbeat) -> None:
    with RawClient(proxy.host, proxy.port) as raw:
        raw.send(startup_packet({"user": USER, "database": "app"}))
        kind, _ = raw.read() or (b"", b"")
        assert kind == b"R"  # AuthenticationSASL, then the client says nothing
        fatal_then_close(raw, timeout=10)


def test_short_handshake_timeout(tenant_db: TenantDb) -> None:
    running = start_proxy(tenant_db.policy("enforce", limits={"handshake_timeout_s": 0.5}))
    try:
        with RawClient(running.host, running.port) as raw:
            start = time.monotonic()
            fatal_then_close(raw, timeout=5)
            assert time.monotonic() - start < 2
        with psycopg.connect(running.dsn(USER, PASSWORD)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        stop_when_idle(running)


def test_bad_scram_messages(proxy: Proxy, heartbeat: Heartbeat) -> None:
    bodies = [
        b"SCRAM-SHA-256\x00" + struct.pack("!i", 5) + b"n,,n=",  # garbage client-first
        b"NOT-A-MECHANISM\x00" + struct.pack("!i", -1),
        b"SCRAM-SHA-256\x00" + struct.pack("!i", 9999) + b"short",
        b"no terminator",
    ]
    for body in bodies:
        with RawClient(proxy.host, proxy.port) as raw:
            raw.send(startup_packet({"user": USER, "database": "app"}))
            assert (raw.read() or (b"",))[0] == b"R"
            raw.send(msg(b"p", body))
            raw.sock.settimeout(5)
            item = raw.read()
            assert item is not None
            assert item[0] == b"E"
            assert error_fields(item[1])["S"] == "FATAL"
            assert raw.closed_by_peer()
    with RawClient(proxy.host, proxy.port) as raw:  # a Query instead of a password
        raw.send(startup_packet({"user": USER, "database": "app"}))
        assert (raw.read() or (b"",))[0] == b"R"
        raw.send(query("SELECT 1"))
        assert raw.closed_by_peer()


# --- after login -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"Q" + struct.pack("!I", 0x7FFFFFFF) + b"SELECT", id="2GiB-length"),
        pytest.param(b"Q" + struct.pack("!I", 0xFFFFFFFF), id="4GiB-length"),
        pytest.param(b"Q" + struct.pack("!I", 3), id="length-below-4"),
        pytest.param(
            query("SELECT '" + "x" * (MAX_MESSAGE + 10) + "'"), id="over-max_message_bytes"
        ),
        pytest.param(msg(b"z", b"what"), id="unknown-type"),
        pytest.param(msg(b"p", b"late password\x00"), id="password-after-login"),
        pytest.param(msg(b"Q", b"SELECT 1"), id="query-without-terminator"),
        pytest.param(msg(b"Q", b"SELECT '\xff\xfe'\x00"), id="query-not-utf8"),
        pytest.param(msg(b"Q", b"SELECT 1\x00trailing\x00"), id="query-trailing-bytes"),
        pytest.param(msg(b"P", b"s\x00SELECT 1\x00\x00\x05"), id="parse-truncated-types"),
        pytest.param(msg(b"P", b"s\x00SELECT 1\x00\xff\xff"), id="parse-negative-count"),
        pytest.param(msg(b"B", b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\x00"), id="bind-bad-length"),
        pytest.param(msg(b"E", b"\x00"), id="execute-truncated"),
        pytest.param(msg(b"D", b"X\x00"), id="describe-bad-kind"),
        pytest.param(msg(b"C", b"S"), id="close-truncated"),
    ],
)
def test_bad_message_after_login(proxy: Proxy, heartbeat: Heartbeat, data: bytes) -> None:
    with logged_in(proxy) as raw:
        raw.send(data)
        fatal_then_close(raw)
    assert wait_for(lambda: len(proxy_server(proxy).sessions) == 1)  # only the heartbeat


def test_message_just_under_the_limit_is_fine(proxy: Proxy) -> None:
    with logged_in(proxy) as raw:
        text = "x" * (MAX_MESSAGE - 100)
        assert rows_of(raw.simple(f"SELECT length('{text}')")) == [[str(len(text))]]


def test_truncated_message_then_close(proxy: Proxy, heartbeat: Heartbeat) -> None:
    for cut in (1, 4, 7):
        with logged_in(proxy) as raw:
            raw.send(query("SELECT 1")[:cut])
    assert wait_for(lambda: len(proxy_server(proxy).sessions) == 1)


def test_stalled_half_message_does_not_block_others(proxy: Proxy, heartbeat: Heartbeat) -> None:
    with logged_in(proxy) as stalled:
        stalled.send(query("SELECT 'complete me'")[:6])
        assert heartbeat.beats_during(0.5) > 0
        stalled.send(query("SELECT 'complete me'")[6:])
        assert rows_of(stalled.read_until_ready()) == [["complete me"]]


def test_client_not_reading_a_big_result(proxy: Proxy, heartbeat: Heartbeat) -> None:
    """Backpressure: a client that stops reading stalls only its own session, and
    the proxy does not buffer the result meanwhile."""
    with logged_in(proxy) as slow:
        with RssSampler() as rss:
            slow.send(query("SELECT repeat('x', 100000) FROM generate_series(1, 1000)"))  # 100 MB
            time.sleep(1.0)
            assert heartbeat.beats_during(0.5) > 0
        assert rss.growth < 40 * MB, f"RSS grew by {rss.growth / MB:.0f} MB while stalled"
        received = 0
        slow.sock.settimeout(30)
        while (item := slow.read()) is not None and item[0] != b"Z":
            received += item[0] == b"D"
        assert received == 1000


def test_abandoning_a_big_result(proxy: Proxy, heartbeat: Heartbeat) -> None:
    slow = logged_in(proxy)
    slow.send(query("SELECT repeat('x', 100000) FROM generate_series(1, 500)"))
    time.sleep(0.3)
    slow.close()
    assert wait_for(lambda: len(proxy_server(proxy).sessions) == 1)


def test_tenant_connection_limit(proxy: Proxy, heartbeat: Heartbeat) -> None:
    with logged_in(proxy), RawClient(proxy.host, proxy.port) as first:
        first.login("initech_app", "initech-pw")
        with RawClient(proxy.host, proxy.port) as second:
            with pytest.raises(ServerError) as info:
                second.login("initech_app", "initech-pw")
            assert (info.value.fields["S"], info.value.sqlstate) == ("FATAL", "53300")
    assert wait_for(lambda: len(proxy_server(proxy).sessions) == 1)
    with RawClient(proxy.host, proxy.port) as again:  # the slot is free again
        again.login("initech_app", "initech-pw")


# --- upstream trouble ------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_upstream_unreachable(tenant_db: TenantDb) -> None:
    policy = tenant_db.policy("enforce", upstream={"port": _closed_port(), "connect_timeout_s": 2})
    running = start_proxy(policy)
    try:
        for _ in range(3):
            with RawClient(running.host, running.port) as raw:
                with pytest.raises(ServerError) as info:
                    raw.login(USER, PASSWORD)
                fields = info.value.fields
                assert (fields["S"], fields["C"]) == ("FATAL", "08006")
                assert fields["M"] == "tenantgate: could not connect to the upstream database"
                assert raw.closed_by_peer()
        with pytest.raises(psycopg.OperationalError, match="could not connect to the upstream"):
            psycopg.connect(running.dsn(USER, PASSWORD))
        # a wrong password is still a 28P01, not a hint that the upstream is down
        with RawClient(running.host, running.port) as raw, pytest.raises(ServerError) as info:
            raw.login(USER, "wrong")
        assert info.value.sqlstate == "28P01"
    finally:
        stop_when_idle(running)


def test_upstream_refuses_login(tenant_db: TenantDb) -> None:
    running = start_proxy(tenant_db.policy("enforce", upstream={"password": "not-it"}))
    try:
        with RawClient(running.host, running.port) as raw, pytest.raises(ServerError) as info:
            raw.login(USER, PASSWORD)
        assert info.value.sqlstate == "08006"
        assert "not-it" not in str(info.value.fields)
    finally:
        stop_when_idle(running)


def _terminate(tenant_db: TenantDb, pid: int) -> None:
    with tenant_db.connect() as su:
        assert su.execute("SELECT pg_terminate_backend(%s)", (pid,)).fetchone() == (True,)


def test_upstream_backend_killed_while_idle(
    proxy: Proxy, tenant_db: TenantDb, heartbeat: Heartbeat
) -> None:
    conn = psycopg.connect(proxy.dsn(USER, PASSWORD), autocommit=True)
    try:
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        _terminate(tenant_db, backend[0])
        time.sleep(0.2)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("SELECT 1")
        assert isinstance(info.value, errors.AdminShutdown) or conn.closed or conn.broken
    finally:
        conn.close()
    assert wait_for(lambda: len(proxy_server(proxy).sessions) == 1)


def test_upstream_backend_killed_during_query(
    proxy: Proxy, tenant_db: TenantDb, heartbeat: Heartbeat
) -> None:
    with logged_in(proxy) as raw:
        [[pid]] = rows_of(raw.simple("SELECT pg_backend_pid()"))
        assert pid is not None
        raw.send(query("SELECT pg_sleep(10)"))
        time.sleep(0.3)
        _terminate(tenant_db, int(pid))
        raw.sock.settimeout(5)
        messages = raw.read_to_eof()
        fields = [error_fields(p) for k, p in messages if k == b"E"]
        assert [(f["S"], f["C"]) for f in fields] == [("FATAL", "57P01")]
    assert wait_for(lambda: len(proxy_server(proxy).sessions) == 1)


# --- shutdown ---------------------------------------------------------------------------


def test_stop_with_open_connections(tenant_db: TenantDb) -> None:
    """Shutdown ends open sessions with 57P01 and handshakes in flight, without an
    unhandled loop exception (cancelled start_server tasks are one on Python 3.11)."""
    LOOP_GUARD.take(collect=True)
    running = start_proxy(tenant_db.policy("enforce", limits={"shutdown_timeout_s": 1}))
    idle = RawClient(running.host, running.port)
    half = RawClient(running.host, running.port)
    try:
        idle.login(USER, PASSWORD)
        half.send(startup_packet({"user": USER, "database": "app"}))
        assert (half.read() or (b"",))[0] == b"R"
        running.stop()
        idle.sock.settimeout(5)
        shutdown_errors = [error_fields(p) for k, p in idle.read_to_eof() if k == b"E"]
        loop_errors: list[Any] = LOOP_GUARD.take(collect=True)
        assert loop_errors == []
        assert [f["C"] for f in shutdown_errors] == ["57P01"]
    finally:
        idle.close()
        half.close()
        running.stop()
