"""Helpers of the end-to-end isolation suite.

* :class:`LibpqClient`: libpq (``psycopg.pq``) at the message level: the simple
  protocol (``PQsendQuery``: one Query message, every statement's result) and
  the extended protocol (``PQsendQueryParams``: Parse/Bind/Describe/Execute/
  Sync of the unnamed statement, text parameters).  Every string a statement
  returns (rows, command tags, errors with every field, notices) is kept.
* :class:`RawClient`: a socket speaking the protocol with the proxy's own
  encoders (``tenantgate.protocol``) after a SCRAM login (``scramp``), for
  what libpq cannot send (NUL bytes inside a parameter, re-used statement names
  inside one pipeline, declared parameter types).
* :func:`leaks`: which other-tenant markers a text reveals.
* :func:`load_corpus`: the data-file corpus of ``tests/corpus``.
"""

from __future__ import annotations

import contextlib
import secrets
import select
import socket
import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psycopg import pq
from scramp import ScramClient

from tenantgate.protocol.backend import (
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    Authentication,
    DataRow,
    ErrorResponse,
)
from tenantgate.protocol.framing import MessageReader
from tenantgate.protocol.frontend import (
    PasswordMessage,
    Query,
    SASLInitialResponse,
    Sync,
)
from tenantgate.protocol.startup import StartupMessage

_TESTS = Path(__file__).resolve().parents[1]
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))

from analysis.analysis_corpus import (  # noqa: E402
    POLICY,
    RLS_POLICY,
    Case,
    judge,
    load_cases,
)

TENANT = "acme"
OTHER_TENANTS = ("globex", "initech")
# Seed values (tests/support/db.py) that only other tenants' rows hold.
STRONG_MARKERS = tuple(
    marker
    for other in OTHER_TENANTS
    for marker in (f"{other}-secret", f"{other}-item", f"{other} customer", f"@{other}.example")
)
REJECTED = "42501"
# A role with BYPASSRLS (created by conftest) for enforce-mode proxies: with it the
# analyser is the only barrier between tenants.
BYPASS_ROLE = "tg_sec_enforce"
BYPASS_PASSWORD = "sec-" + secrets.token_urlsafe(12)


def enforce_only_overrides() -> dict[str, Any]:
    """Policy overrides for an enforce-mode proxy whose upstream bypasses RLS."""
    return {"upstream": {"user": BYPASS_ROLE, "password": BYPASS_PASSWORD}}


# --- verdicts ------------------------------------------------------------------------


def load_corpus() -> list[Case]:
    return load_cases()


def adversarial(cases: Iterable[Case]) -> list[Case]:
    return [c for c in cases if c.file.startswith("adv_")]


def legitimate(cases: Iterable[Case]) -> list[Case]:
    return [c for c in cases if c.file.startswith("legit_")]


def expected_verdict(case: Case, mode: str) -> str:
    """The analyser's verdict for ``case`` under ``mode`` ("enforce"/"both" or "rls")."""
    checks_predicates = mode in ("enforce", "both")
    if (case.mode == "rls") != (not checks_predicates):
        forced = Case(
            case.file,
            case.index,
            case.sql,
            case.verdict,
            case.rule,
            case.note,
            case.params,
            "enforce" if checks_predicates else "rls",
        )
        return judge(forced, POLICY, RLS_POLICY)[0]
    return case.verdict


def leaks(text: str, sql: str = "", params: Sequence[str | None] = ()) -> list[str]:
    """Other-tenant markers in ``text`` that the statement itself did not contain.

    Seed values of other tenants always count; a bare other tenant id counts
    unless the statement (or a parameter) spelled it.
    """
    lowered = text.lower()
    spelled = (sql + "\x00" + "\x00".join(p or "" for p in params)).lower()
    found = [m for m in STRONG_MARKERS if m in lowered and m not in spelled]
    found += [t for t in OTHER_TENANTS if t in lowered and t not in spelled]
    return found


def is_rejection(error: dict[str, str] | None) -> bool:
    return (
        error is not None
        and error.get("C") == REJECTED
        and error.get("M", "").startswith("tenantgate:")
    )


# --- libpq -----------------------------------------------------------------------------


@dataclass
class Outcome:
    """What one statement (string) produced."""

    errors: list[dict[str, str]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    # One (column names, rows) pair per result set.
    results: list[tuple[list[str], list[tuple[str | None, ...]]]] = field(default_factory=list)

    @property
    def rows(self) -> list[tuple[str | None, ...]]:
        return [row for _, rows in self.results for row in rows]

    @property
    def error(self) -> dict[str, str] | None:
        return self.errors[0] if self.errors else None

    @property
    def rejected(self) -> bool:
        return is_rejection(self.error)


def _wait(fd: int, write: bool = False, timeout: float = 30) -> None:
    readable, writable, _ = select.select([] if write else [fd], [fd] if write else [], [], timeout)
    if not readable and not writable:
        raise TimeoutError("no answer from the proxy within 30 s")


def _decode(value: bytes | memoryview | None) -> str | None:
    return None if value is None else bytes(value).decode("utf-8", "replace")


class LibpqClient:
    """A libpq connection driven message by message (no psycopg query rewriting)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.notices: list[dict[str, str]] = []
        self._finished = False
        self.pgconn = self._connect()

    def _connect(self) -> pq.PGconn:
        # Non-blocking all the way: the proxy runs in this process, and a libpq call
        # that blocks while holding the GIL would starve the proxy's thread.
        conn = pq.PGconn.connect_start(self.dsn.encode())
        while True:
            state = conn.connect_poll()
            if state == pq.PollingStatus.OK:
                break
            if state == pq.PollingStatus.FAILED:
                message = _decode(conn.error_message)
                conn.finish()
                raise ConnectionError(f"cannot connect through the proxy: {message}")
            _wait(conn.socket, write=state == pq.PollingStatus.WRITING)
        conn.nonblocking = 1
        conn.notice_handler = self._on_notice
        return conn

    def _on_notice(self, result: pq.PGresult) -> None:
        self.notices.append(self._fields(result))

    @staticmethod
    def _fields(result: pq.PGresult) -> dict[str, str]:
        out: dict[str, str] = {}
        for diag in pq.DiagnosticField:
            value = result.error_field(diag)
            if value is not None:
                out[chr(diag.value)] = _decode(value) or ""
        return out

    @property
    def alive(self) -> bool:
        return self.pgconn.status == pq.ConnStatus.OK

    @property
    def transaction_status(self) -> pq.TransactionStatus:
        return self.pgconn.transaction_status

    def reconnect(self) -> None:
        self.close()
        self.pgconn = self._connect()
        self._finished = False

    def close(self) -> None:
        if not self._finished:
            self._finished = True
            self.pgconn.finish()

    def simple(self, sql: str) -> Outcome:
        self.pgconn.send_query(sql.encode())
        return self._collect()

    def extended(self, sql: str, params: Sequence[str | None] = ()) -> Outcome:
        values = [None if p is None else p.encode() for p in params]
        self.pgconn.send_query_params(sql.encode(), values)
        return self._collect()

    def _flush(self) -> None:
        while self.pgconn.flush() == 1:
            _wait(self.pgconn.socket, write=True)

    def _next_result(self) -> pq.PGresult | None:
        self._flush()
        while self.pgconn.is_busy():
            _wait(self.pgconn.socket)
            self.pgconn.consume_input()
        return self.pgconn.get_result()

    def _copy_chunk(self) -> bytes | None:
        while True:
            size, data = self.pgconn.get_copy_data(1)
            if size > 0:
                return bytes(data)
            if size < 0:
                return None
            _wait(self.pgconn.socket)
            self.pgconn.consume_input()

    def run(self, sql: str, params: Sequence[str | None] | None, protocol: str) -> Outcome:
        if protocol == "simple":
            return self.simple(sql)
        return self.extended(sql, params or ())

    def _collect(self) -> Outcome:
        outcome = Outcome()
        notices_before = len(self.notices)
        while (result := self._next_result()) is not None:
            status = result.status
            if status == pq.ExecStatus.COPY_OUT:
                while (chunk := self._copy_chunk()) is not None:
                    outcome.texts.append(chunk.decode("utf-8", "replace"))
                continue
            if status == pq.ExecStatus.COPY_IN:
                while self.pgconn.put_copy_end(b"tenantgate security suite: no COPY FROM") == 0:
                    _wait(self.pgconn.socket, write=True)
                continue
            if status in (pq.ExecStatus.FATAL_ERROR, pq.ExecStatus.NONFATAL_ERROR):
                fields = self._fields(result)
                outcome.errors.append(fields)
                outcome.texts.extend(fields.values())
                continue
            if status == pq.ExecStatus.TUPLES_OK:
                names = [_decode(result.fname(c)) or "" for c in range(result.nfields)]
                rows = [
                    tuple(_decode(result.get_value(r, c)) for c in range(result.nfields))
                    for r in range(result.ntuples)
                ]
                outcome.results.append((names, rows))
                outcome.texts.extend(names)
                outcome.texts.extend(v for row in rows for v in row if v is not None)
            tag = _decode(result.command_status)
            if tag:
                outcome.texts.append(tag)
        if self.pgconn.status != pq.ConnStatus.OK:
            message = _decode(self.pgconn.error_message) or "connection lost"
            outcome.errors.append({"C": "08006", "M": message})
            outcome.texts.append(message)
        for notice in self.notices[notices_before:]:
            outcome.texts.extend(notice.values())
        return outcome

    def pipeline(
        self, statements: Sequence[tuple[str, Sequence[str | None]]]
    ) -> list[tuple[pq.ExecStatus, dict[str, str], list[tuple[str | None, ...]]]]:
        """libpq pipeline mode: every statement, one Sync; (status, error, rows) per result."""
        conn = self.pgconn
        conn.enter_pipeline_mode()
        for sql, params in statements:
            values = [None if p is None else p.encode() for p in params]
            conn.send_query_params(sql.encode(), values)
        conn.pipeline_sync()
        out: list[tuple[pq.ExecStatus, dict[str, str], list[tuple[str | None, ...]]]] = []
        while True:
            result = self._next_result()
            if result is None:  # end of one statement's results
                continue
            status = pq.ExecStatus(result.status)
            rows = [
                tuple(_decode(result.get_value(r, c)) for c in range(result.nfields))
                for r in range(result.ntuples)
            ]
            error = self._fields(result) if status == pq.ExecStatus.FATAL_ERROR else {}
            out.append((status, error, rows))
            if status == pq.ExecStatus.PIPELINE_SYNC:
                break
        conn.exit_pipeline_mode()
        return out

    def usable(self) -> bool:
        """The connection answers a new statement and is outside a transaction."""
        if not self.alive:
            return False
        out = self.simple("SELECT 1")
        return (
            out.error is None
            and out.rows == [("1",)]
            and self.transaction_status == pq.TransactionStatus.IDLE
        )

    def __enter__(self) -> LibpqClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- raw protocol -----------------------------------------------------------------------

Message = tuple[bytes, bytes]


class RawClient:
    """The frontend side of the protocol over a plain socket."""

    def __init__(self, host: str, port: int, timeout: float = 10) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = MessageReader()

    def send(self, *messages: bytes) -> None:
        self.sock.sendall(b"".join(messages))

    def read(self) -> Message:
        while (item := self.reader.next_message()) is None:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("the proxy closed the connection")
            self.reader.feed(data)
        msg_type, payload = item
        return bytes((msg_type,)), payload

    def read_until_ready(self) -> list[Message]:
        out: list[Message] = []
        while True:
            message = self.read()
            out.append(message)
            if message[0] == b"Z":
                return out

    def login(self, user: str, password: str, database: str) -> list[Message]:
        """StartupMessage and SCRAM-SHA-256 (client side by scramp) up to ReadyForQuery."""
        params = (("user", user), ("database", database), ("client_encoding", "UTF8"))
        self.send(StartupMessage(3 << 16, params).encode())
        scram: ScramClient | None = None
        while True:
            kind, payload = self.read()
            if kind == b"E":
                raise ConnectionError(str(ErrorResponse.decode(payload).fields))
            if kind != b"R":
                continue
            auth = Authentication.decode(payload)
            if auth.code == AUTH_SASL:
                scram = ScramClient(list(auth.sasl_mechanisms()), user, password)
                first = scram.get_client_first().encode()
                self.send(SASLInitialResponse(scram.mechanism_name, first).encode())
            elif auth.code == AUTH_SASL_CONTINUE and scram is not None:
                scram.set_server_first(auth.data.decode())
                self.send(PasswordMessage(scram.get_client_final().encode()).encode())
            elif auth.code == AUTH_SASL_FINAL and scram is not None:
                scram.set_server_final(auth.data.decode())
            elif auth.code == AUTH_OK:
                return self.read_until_ready()
            else:
                raise ConnectionError(f"unsupported authentication request {auth.code}")

    def simple(self, sql: str) -> list[Message]:
        self.send(Query(sql).encode())
        return self.read_until_ready()

    def sync(self) -> list[Message]:
        self.send(Sync().encode())
        return self.read_until_ready()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"X\x00\x00\x00\x04")
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def errors_of(messages: Iterable[Message]) -> list[dict[str, str]]:
    return [dict(ErrorResponse.decode(p).fields) for k, p in messages if k == b"E"]


def rows_of(messages: Iterable[Message]) -> list[tuple[str | None, ...]]:
    return [tuple(_decode(v) for v in DataRow.decode(p).values) for k, p in messages if k == b"D"]


def texts_of(messages: Iterable[Message]) -> list[str]:
    """Every string the client was shown: row values, errors and notices (all fields)."""
    out: list[str] = []
    for kind, payload in messages:
        if kind == b"D":
            out.extend(_decode(v) or "" for v in DataRow.decode(payload).values)
        elif kind in (b"E", b"N"):
            out.extend(v for _, v in ErrorResponse.decode(payload).fields)
        elif kind == b"C":
            out.append(payload.rstrip(b"\x00").decode("utf-8", "replace"))
    return out


def int4(value: int) -> bytes:
    return struct.pack("!i", value)


def foreign_rows(outcome: Outcome) -> list[tuple[str | None, ...]]:
    """Rows of a result set whose ``tenant_id`` column is not this tenant."""
    out: list[tuple[str | None, ...]] = []
    for names, rows in outcome.results:
        positions = [i for i, name in enumerate(names) if name == "tenant_id"]
        out.extend(
            row for row in rows for i in positions if row[i] is not None and row[i] != TENANT
        )
    return out
