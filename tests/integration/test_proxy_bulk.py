"""Volume through the proxy: COPY of 100 MB each way and a ~1 GiB, 1M-row result,
with the process RSS (the in-process proxy included) staying far below the
data size, i.e. the proxy streams with backpressure instead of buffering.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from proxy_helpers import Proxy, RssSampler, start_proxy, stop_when_idle

from support.db import TenantDb

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

Conn = psycopg.Connection[tuple[Any, ...]]
MB = 1024 * 1024
RSS_BUDGET = 200 * MB


@pytest.fixture(scope="module")
def proxy(tenant_db: TenantDb) -> Iterator[Proxy]:
    running = start_proxy(tenant_db.policy("enforce"))
    try:
        yield running
    finally:
        stop_when_idle(running)


@pytest.fixture
def conn(proxy: Proxy) -> Iterator[Conn]:
    with psycopg.connect(proxy.dsn("acme_app", "acme-pw"), autocommit=True) as connection:
        yield connection


def test_copy_in_100mb(conn: Conn) -> None:
    conn.execute("CREATE TEMP TABLE bulk_in (id int, payload text)")
    line_payload = "p" * 1000
    rows = 105_000  # > 100 MiB of COPY text
    batch = 1000
    sent = 0
    with RssSampler() as rss, conn.cursor() as cur, cur.copy("COPY bulk_in FROM STDIN") as copy:
        for start in range(0, rows, batch):
            chunk = "".join(f"{i}\t{line_payload}\n" for i in range(start, start + batch)).encode()
            copy.write(chunk)
            sent += len(chunk)
    assert sent > 100 * MB
    row = conn.execute("SELECT count(*), sum(length(payload)), max(id) FROM bulk_in").fetchone()
    assert row == (rows, rows * 1000, rows - 1)
    assert rss.growth < RSS_BUDGET, f"RSS grew by {rss.growth / MB:.0f} MB"


def test_copy_out_100mb(conn: Conn) -> None:
    rows = 100 * 1024
    sql = f"COPY (SELECT g, repeat('y', 1000) FROM generate_series(1, {rows}) g) TO STDOUT"
    total = lines = 0
    with RssSampler() as rss, conn.cursor() as cur, cur.copy(sql) as copy:
        for chunk in copy:
            total += len(chunk)
            lines += bytes(chunk).count(b"\n")
    expected = sum(len(str(g)) for g in range(1, rows + 1)) + rows * (1 + 1000 + 1)
    assert (lines, total) == (rows, expected)
    assert rss.growth < RSS_BUDGET, f"RSS grew by {rss.growth / MB:.0f} MB"
    assert conn.execute("SELECT 'after copy'").fetchone() == ("after copy",)


def test_one_million_rows_streamed(conn: Conn) -> None:
    """~1 GiB of DataRows: streamed row by row by the client, never buffered."""
    count = total = 0
    # libpq >= 17 can hand rows over in chunks (fewer Python calls, same streaming)
    size = 1000 if psycopg.pq.version() >= 170000 else 1
    sql = "SELECT repeat('x', 1000) FROM generate_series(1, 1000000)"
    with RssSampler() as rss, conn.cursor() as cur:
        for (value,) in cur.stream(sql, size=size):
            count += 1
            total += len(value)
    assert (count, total) == (1_000_000, 1_000_000_000)
    assert rss.growth < RSS_BUDGET, f"RSS grew by {rss.growth / MB:.0f} MB"
    assert conn.execute("SELECT 'after stream'").fetchone() == ("after stream",)


def test_server_side_cursor_large_result(conn: Conn) -> None:
    with RssSampler() as rss, conn.transaction(), conn.cursor(name="bulk") as cur:
        cur.itersize = 5000
        cur.execute("SELECT g, repeat('z', 1000) FROM generate_series(1, 100000) g")
        count = total = 0
        for g, text in cur:
            count += 1
            total += g + len(text)
    assert count == 100_000
    assert total == sum(range(1, 100_001)) + 100_000 * 1000
    assert rss.growth < RSS_BUDGET
