"""tenantgate's memory with idle clients and the largest client count it holds.

Opens authenticated connections with asyncpg (each one completes SCRAM with
tenantgate, which opens and authenticates its own upstream connection) and
reads ``VmRSS`` of the tenantgate process from ``/proc``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg
from services import BENCH_TENANT, DATABASE, HOST, Tenantgate, raise_nofile, rss_kib

CONCURRENT_HANDSHAKES = 64


@dataclass
class ConnectionResult:
    rss_start_mib: float = 0.0
    idle_clients: int = 0
    idle_opened: int = 0
    rss_idle_mib: float = 0.0
    rss_per_client_kib: float = 0.0
    idle_open_seconds: float = 0.0
    max_attempted: int = 0
    max_held: int = 0
    rss_at_max_mib: float = 0.0
    max_open_seconds: float = 0.0
    first_error: str = ""
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


async def _open_many(
    proxy: Tenantgate, count: int, result: ConnectionResult
) -> list[asyncpg.Connection]:
    user = proxy.user_of(BENCH_TENANT)
    password = proxy.passwords[BENCH_TENANT]
    gate = asyncio.Semaphore(CONCURRENT_HANDSHAKES)
    conns: list[asyncpg.Connection] = []

    async def one() -> None:
        async with gate:
            try:
                conn = await asyncpg.connect(
                    host=HOST,
                    port=proxy.port,
                    user=user,
                    password=password,
                    database=DATABASE,
                    ssl=False,
                    timeout=120,
                    statement_cache_size=0,
                )
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                result.errors[text] = result.errors.get(text, 0) + 1
                if not result.first_error:
                    result.first_error = text
                return
            conns.append(conn)

    await asyncio.gather(*(one() for _ in range(count)))
    return conns


async def _check_alive(conns: list[asyncpg.Connection], sample: int = 20) -> int:
    """Run SELECT 1 on a sample of the held connections; how many answered."""
    ok = 0
    step = max(1, len(conns) // sample)
    for conn in conns[::step]:
        try:
            if await conn.fetchval("SELECT 1", timeout=30) == 1:
                ok += 1
        except Exception:
            continue
    return ok


def _close(conns: list[asyncpg.Connection]) -> None:
    for conn in conns:
        conn.terminate()


async def _measure(proxy: Tenantgate, idle: int, maximum: int) -> ConnectionResult:
    result = ConnectionResult()
    raise_nofile()
    result.rss_start_mib = rss_kib(proxy.pid)["VmRSS"] / 1024
    result.idle_clients = idle
    started = time.monotonic()
    conns = await _open_many(proxy, idle, result)
    result.idle_open_seconds = time.monotonic() - started
    result.idle_opened = len(conns)
    await _check_alive(conns)
    await asyncio.sleep(2)
    rss = rss_kib(proxy.pid)["VmRSS"]
    result.rss_idle_mib = rss / 1024
    if conns:
        result.rss_per_client_kib = (rss - result.rss_start_mib * 1024) / len(conns)
    if maximum > idle and len(conns) == idle:
        result.max_attempted = maximum
        started = time.monotonic()
        conns += await _open_many(proxy, maximum - idle, result)
        result.max_open_seconds = time.monotonic() - started
        await asyncio.sleep(2)
        alive = await _check_alive(conns)
        result.max_held = len(conns) if alive else 0
        result.rss_at_max_mib = rss_kib(proxy.pid)["VmRSS"] / 1024
    else:
        result.max_attempted = idle
        result.max_held = len(conns)
        result.rss_at_max_mib = result.rss_idle_mib
    _close(conns)
    await asyncio.sleep(1)
    return result


def measure_connections(proxy: Tenantgate, idle: int, maximum: int) -> ConnectionResult:
    return asyncio.run(_measure(proxy, idle, maximum))
