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

Protocols ``w3-simple``, ``w3-extended`` and ``w3-prepared`` are per
transaction instead: W3's seven statements (BEGIN, the TPC-B-like body with
the tenant, COMMIT), each its own Query or Sync as pgbench sends them (simple:
new inlined values in every transaction); use ``--mode both`` as W3 does.
The server's answers are made once by a small responder while warming up
and then replayed.  ``--site DIR`` imports tenantgate from DIR (e.g. the
build ``baseline.py`` made of an earlier commit) to compare two builds.
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
if "--site" in sys.argv:  # before tenantgate is imported
    sys.path.insert(0, sys.argv[sys.argv.index("--site") + 1])

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
from tenantgate.protocol.framing import frame, scan_frames
from tenantgate.protocol.frontend import Bind, Describe, Execute, Parse, Query, Sync
from tenantgate.session import Session, SessionInfo

POLICY = """
listen: {host: 127.0.0.1, port: 0}
upstream: {host: 127.0.0.1, port: 1, database: bench, user: bench, password: x}
mode: MODE
tables:
  pgbench_accounts: tenant_id
  pgbench_tellers: tenant_id
  pgbench_branches: tenant_id
  pgbench_history: tenant_id
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


def _row_description() -> bytes:
    return RowDescription((FieldDescription("abalance", 0, 0, 23, 4, -1, 0),)).encode()


def _answer() -> bytes:
    return _row_description() + DataRow((b"0",)).encode() + CommandComplete("SELECT 1").encode()


def wire(
    policy_text: str, client: Sink, upstream: Sink, tenant: str = "acme"
) -> tuple[Session, ProxyApp]:
    """A session of ``tenant`` (user ``<tenant>_app``) wired as ``serve`` wires it
    (ProxyApp's inspector, analysis cache, telemetry and metrics; the injector in
    rls/both mode), writing to ``client`` and ``upstream`` instead of sockets.  Needs
    a running event loop."""
    app = ProxyApp(parse_policy(policy_text))
    info = SessionInfo("bench", tenant, f"{tenant}_app", "127.0.0.1", 0, 1, b"k", time.time())
    session = Session(
        info,
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        _Upstream(),  # type: ignore[arg-type]
        app._inspector(app.policy, info),
        app.policy.limits.max_message_bytes,
        TenantInjector(app.policy.tenant_setting, tenant) if app.policy.injects_tenant else None,
    )
    session._client_transport = client  # type: ignore[assignment]
    session._upstream_transport = upstream  # type: ignore[assignment]
    session._finished = asyncio.get_running_loop().create_future()
    app._session_started(session)
    return session, app


def build(mode: str, upstream: Sink | None = None) -> tuple[Session, Any]:
    """A session as ``serve`` sets it up: the rate limiter's hook only if the tenant
    has a limit, and the steady-state lane where it applies (``TENANTGATE_LANE=0``
    measures without it)."""
    session, app = wire(POLICY.replace("MODE", mode), Sink(), upstream or Sink())
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


# W3's body as pgbench -M extended/prepared sends it (its :variables as $n, in order).
W3_STATEMENTS = (
    ("BEGIN", ()),
    ("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE tenant_id = $2 AND aid = $3",
     (b"-12", b"acme", b"4242")),
    ("SELECT abalance FROM pgbench_accounts WHERE tenant_id = $1 AND aid = $2",
     (b"acme", b"4242")),
    ("UPDATE pgbench_tellers SET tbalance = tbalance + $1 WHERE tenant_id = $2 AND tid = $3",
     (b"-12", b"acme", b"17")),
    ("UPDATE pgbench_branches SET bbalance = bbalance + $1 WHERE tenant_id = $2 AND bid = $3",
     (b"-12", b"acme", b"3")),
    ("INSERT INTO pgbench_history (tenant_id, tid, bid, aid, delta, mtime) "
     "VALUES ($1, $2, $3, $4, $5, CURRENT_TIMESTAMP)",
     (b"acme", b"17", b"3", b"4242", b"-12")),
    ("COMMIT", ()),
)  # fmt: skip


def w3_chunks(protocol: str) -> list[bytes]:
    """One W3 transaction's client chunks: Parse (unnamed) or the prepared statement
    ``w3_<n>``, Bind, Describe portal, Execute, Sync per statement."""
    chunks = []
    for number, (sql, params) in enumerate(W3_STATEMENTS):
        name = f"w3_{number}" if protocol == "w3-prepared" else ""
        parse = Parse("", sql, ()).encode() if not name else b""
        bind = Bind("", name, (), params, ()).encode()
        chunks.append(
            parse + bind + Describe("P", "").encode() + Execute("", 0).encode() + Sync().encode()
        )
    return chunks


# The same body as pgbench -M simple sends it: every variable inlined.
W3_SIMPLE = (
    "BEGIN;",
    "UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE tenant_id = 'acme' "
    "AND aid = {aid};",
    "SELECT abalance FROM pgbench_accounts WHERE tenant_id = 'acme' AND aid = {aid};",
    "UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tenant_id = 'acme' "
    "AND tid = {tid};",
    "UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE tenant_id = 'acme' "
    "AND bid = {bid};",
    "INSERT INTO pgbench_history (tenant_id, tid, bid, aid, delta, mtime) "
    "VALUES ('acme', {tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);",
    "COMMIT;",
)


def w3_simple_transactions(count: int) -> Iterator[list[bytes]]:
    """W3 simple's client chunks, one list per transaction, with pgbench's random values."""
    rng = random.Random(3)
    for _ in range(count):
        values = {
            "aid": rng.randint(1, 100_000),
            "bid": rng.randint(1, 1),
            "tid": rng.randint(1, 10),
            "delta": rng.randint(-5000, 5000),
        }
        yield [Query(sql.format(**values)).encode() for sql in W3_SIMPLE]


class Responder:
    """What PostgreSQL answers to the bytes a session sent upstream, for W3's
    statements and the injected set_config (enough of it for this workload)."""

    def __init__(self) -> None:
        self.texts: dict[str, str] = {}
        self.portals: dict[str, str] = {}
        self.status = "I"

    def answer(self, sent: bytes) -> bytes:
        out = []
        for msg_type, start, end in scan_frames(sent, 1 << 20)[0]:
            payload = sent[start:end]
            if msg_type == 0x50:
                parse = Parse.decode(payload)
                self.texts[parse.name] = parse.query
                out.append(frame(b"1"))
            elif msg_type == 0x42:
                bind = Bind.decode(payload)
                self.portals[bind.portal] = self.texts[bind.statement]
                out.append(frame(b"2"))
            elif msg_type == 0x44:
                text = self.portals[Describe.decode(payload).name]
                out.append(_row_description() if text.startswith("SELECT") else frame(b"n"))
            elif msg_type == 0x45:  # (its RowDescription answered the Describe)
                self._result(self.portals[Execute.decode(payload).portal], out)
            elif msg_type == 0x43:
                out.append(frame(b"3"))
            elif msg_type == 0x53:
                out.append(ReadyForQuery(self.status).encode())
            elif msg_type == 0x51:  # no ';' inside W3's literals: split the statements
                for piece in Query.decode(payload).query.split(";"):
                    text = piece.strip()
                    if text.startswith("SELECT"):
                        out.append(_row_description())
                    if text:
                        self._result(text, out)
                out.append(ReadyForQuery(self.status).encode())
        return b"".join(out)

    def _result(self, text: str, out: list[bytes]) -> None:
        """A statement's rows and CommandComplete; BEGIN and COMMIT move the status."""
        if text.startswith("SELECT"):
            out.append(DataRow((b"0",)).encode())
        out.append(_done(text))
        self.status = {"BEGIN": "T", "COMMIT": "I"}.get(text, self.status)


def _done(text: str) -> bytes:
    word = text.split(maxsplit=1)[0]
    tag = {"SELECT": "SELECT 1", "UPDATE": "UPDATE 1", "INSERT": "INSERT 0 1"}.get(word, word)
    return CommandComplete(tag).encode()


class Recorder(Sink):
    """A transport that keeps what it is given while ``recording``."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.recording = True

    def write(self, data: bytes) -> None:
        if self.recording:
            self.data += data

    def take(self) -> bytes:
        """What it kept since the last take."""
        out = bytes(self.data)
        self.data.clear()
        return out


def w3_workload(
    session: Session, recorder: Recorder, protocol: str
) -> tuple[list[bytes], list[bytes]]:
    """(client chunks, the server's answer to each) of one W3 transaction in steady
    state, answered once by the Responder (after a first transaction that prepares
    what is prepared once); ``recorder`` is the session's upstream transport."""
    responder = Responder()
    chunks = next(w3_simple_transactions(1)) if protocol == "w3-simple" else w3_chunks(protocol)
    if protocol == "w3-prepared":
        for number, (sql, _params) in enumerate(W3_STATEMENTS):
            session.client_data(Parse(f"w3_{number}", sql, ()).encode() + Sync().encode())
            session.upstream_data(responder.answer(bytes(recorder.data)))
            recorder.data.clear()
    answers: list[bytes] = []
    for _ in range(2):
        answers = []
        for chunk in chunks:
            session.client_data(chunk)
            answers.append(responder.answer(bytes(recorder.data)))
            recorder.data.clear()
            session.upstream_data(answers[-1])
    recorder.recording = False
    return chunks, answers


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--mode", default="enforce", choices=["enforce", "both", "rls"])
    parser.add_argument("--protocols", default="simple,extended,prepared,unique")
    parser.add_argument("--repeats", type=int, default=5, help="report the best repeat")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--site", help="import tenantgate from this directory")
    return asyncio.run(measure(parser.parse_args()))


async def measure(args: argparse.Namespace) -> int:
    for protocol in args.protocols.split(","):
        recorder = Recorder()
        session, _app = build(args.mode, recorder)
        if protocol == "prepared":
            session.client_data(Parse("s1", PREPARED_SQL, ()).encode() + Sync().encode())
            session.upstream_data(frame(b"1") + ReadyForQuery("I").encode())
        if protocol.startswith("w3-"):
            client, server = w3_workload(session, recorder, protocol)
        else:
            client, server = workload(protocol)
        if protocol.startswith("w3-"):
            # Each transaction's chunks, answered one by one with the answers made above;
            # new values every transaction in simple (made before the clock starts).
            transactions = (
                iter(list(w3_simple_transactions(1000 + args.iterations)))
                if protocol == "w3-simple"
                else itertools.repeat(client)
            )

            def one(session: Session = session, transactions: Iterator[list[bytes]] = transactions,
                    answers: list[bytes] = server) -> None:  # fmt: skip
                for chunk, answer in zip(next(transactions), answers, strict=True):
                    session.client_data(chunk)
                    session.upstream_data(answer)

        else:
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
        if not session.tracker.idle or session.tracker.status != "I":
            print("the replayed answers did not answer every request")
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
        unit = "transaction (7 statements)" if protocol.startswith("w3-") else "statement"
        lane = session._lane
        served = "" if lane is None else f"; the lane answered {lane.served}"
        print(
            f"{args.mode} {protocol}: {costs[0]:.2f} us of CPU per {unit} (best of "
            f"{args.repeats}; median {costs[len(costs) // 2]:.2f}), client messages + server "
            f"answers{served}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
