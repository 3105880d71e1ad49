"""The proxy's own Python cost per statement, without sockets or a database.

    .venv/bin/python benchmarks/hotpath.py [--iterations 200000] [--profile]

Drives a real :class:`tenantgate.session.Session` wired exactly as ``serve``
wires it (``ProxyApp``: policy inspector, analysis cache, telemetry, metrics,
rate limiter, injector in rls/both modes) through transports that discard what
they are given, and feeds it the bytes of W1: a client message (simple Query,
or the Bind/Execute/Sync of a prepared statement) and the server's complete
answer (protocol ``unique``: W4's simple Query with new constants every
time, so only the shape cache can help).  What it reports is microseconds of
CPU per statement spent in tenantgate's Python code, the part of ``cpu_cost.py``'s per-transaction
figure that is not the event loop or the kernel.  ``--profile`` prints the
top functions under cProfile.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import pstats
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))

from tenantgate.app import ProxyApp
from tenantgate.config import parse_policy
from tenantgate.injection import TenantInjector
from tenantgate.protocol.backend import (
    CommandComplete,
    DataRow,
    FieldDescription,
    ReadyForQuery,
    RowDescription,
)
from tenantgate.protocol.framing import frame
from tenantgate.protocol.frontend import Bind, Describe, Execute, Parse, Query, Sync
from tenantgate.session import Session, SessionInfo

POLICY = """
listen: {host: 127.0.0.1, port: 0}
upstream: {host: 127.0.0.1, port: 1, database: bench, user: bench, password: x}
mode: MODE
tables: {pgbench_accounts: tenant_id}
tenants:
  acme: {users: {acme_app: {password: secret}}}
metrics: {enabled: false}
"""
SQL = "SELECT abalance FROM pgbench_accounts WHERE tenant_id = 'acme' AND aid = 42"
PREPARED_SQL = "SELECT abalance FROM pgbench_accounts WHERE tenant_id = $1 AND aid = $2"


class Sink:
    """A transport that accepts everything and sends nothing."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class _Upstream:
    def close(self) -> None:
        pass


def _answer() -> bytes:
    row = RowDescription((FieldDescription("abalance", 0, 0, 23, 4, -1, 0),)).encode()
    return row + DataRow((b"0",)).encode() + CommandComplete("SELECT 1").encode()


def wire(policy_text: str, client: Sink, upstream: Sink) -> tuple[Session, ProxyApp]:
    """A session of tenant ``acme`` wired as ``serve`` wires it (ProxyApp's inspector,
    analysis cache, telemetry and metrics; the injector in rls/both mode), writing to
    ``client`` and ``upstream`` instead of sockets.  Needs a running event loop."""
    app = ProxyApp(parse_policy(policy_text))
    info = SessionInfo("bench", "acme", "acme_app", "127.0.0.1", 0, 1, b"k", time.time())
    session = Session(
        info,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        _Upstream(),  # type: ignore[arg-type]
        app._inspector(app.policy, info),
        app.policy.limits.max_message_bytes,
        TenantInjector(app.policy.tenant_setting, "acme") if app.policy.injects_tenant else None,
    )
    session._client_transport = client  # type: ignore[assignment]
    session._upstream_transport = upstream  # type: ignore[assignment]
    session._finished = asyncio.get_running_loop().create_future()
    app._session_started(session)
    return session, app


def build(mode: str) -> tuple[Session, Any]:
    """A session as ``serve`` sets it up: the rate limiter's hook only if the tenant
    has a limit, and the steady-state lane where it applies (``TENANTGATE_LANE=0``
    measures without it)."""
    session, app = wire(POLICY.replace("MODE", mode), Sink(), Sink())
    app.server._set_rate_limit(session, app.policy)
    session.start_lane()
    return session, app


UNIQUE_SQL = "SELECT abalance FROM pgbench_accounts WHERE tenant_id = 'acme' AND aid = {} LIMIT {}"


def unique_queries(count: int) -> Iterator[list[bytes]]:
    """W4's client messages: every text new (pgbench's random aid and nonce)."""
    rng = random.Random(4)
    for _ in range(count):
        sql = UNIQUE_SQL.format(rng.randint(1, 20_000), rng.randint(1_000_000, 2_000_000_000))
        yield [Query(sql).encode()]


def workload(protocol: str) -> tuple[list[bytes], list[bytes]]:
    """(client chunks, server chunks) of one statement after warm-up."""
    ready = ReadyForQuery("I").encode()
    if protocol == "unique":
        return [], [_answer() + ready]
    if protocol == "simple":
        return [Query(SQL).encode()], [_answer() + ready]
    if protocol == "extended":  # libpq's PQexecParams: the unnamed statement every time
        parse = Parse("", PREPARED_SQL, ()).encode()
        bind = Bind("", "", (0,), (b"acme", b"42"), (0,)).encode()
        messages = parse + bind + Describe("P", "").encode() + Execute("", 0).encode()
        return [messages + Sync().encode()], [frame(b"1") + frame(b"2") + _answer() + ready]
    bind = Bind("", "s1", (0,), (b"acme", b"42"), (0,)).encode()
    return (
        [bind + Describe("P", "").encode() + Execute("", 0).encode() + Sync().encode()],
        [frame(b"2") + _answer() + ready],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--mode", default="enforce", choices=["enforce", "both", "rls"])
    parser.add_argument("--protocols", default="simple,extended,prepared,unique")
    parser.add_argument("--repeats", type=int, default=5, help="report the best repeat")
    parser.add_argument("--profile", action="store_true")
    return asyncio.run(measure(parser.parse_args()))


async def measure(args: argparse.Namespace) -> int:
    for protocol in args.protocols.split(","):
        session, _app = build(args.mode)
        if protocol == "prepared":
            session.client_data(Parse("s1", PREPARED_SQL, ()).encode() + Sync().encode())
            session.upstream_data(frame(b"1") + ReadyForQuery("I").encode())
        client, server = workload(protocol)
        clients = (
            iter(list(unique_queries(1000 + args.iterations)))  # made before the clock starts
            if protocol == "unique"
            else itertools.repeat(client)
        )

        def one(session: Session = session, clients: Iterator[list[bytes]] = clients,
                server: list[bytes] = server) -> None:  # fmt: skip
            for chunk in next(clients):
                session.client_data(chunk)
            for chunk in server:
                session.upstream_data(chunk)

        for _ in range(1000):
            one()
        if session._finished.done():
            print(f"session ended during warm-up: {session._finished.result()!r}")
            return 1
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
        per_repeat = max(args.iterations // args.repeats, 1)
        costs = []
        for _ in range(args.repeats):
            started = time.process_time()
            for _ in range(per_repeat):
                one()
            costs.append(1e6 * (time.process_time() - started) / per_repeat)
        if args.profile:
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        costs.sort()
        print(
            f"{args.mode} {protocol}: {costs[0]:.2f} us of CPU per statement (best of "
            f"{args.repeats}; median {costs[len(costs) // 2]:.2f}), client message + server answer"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
