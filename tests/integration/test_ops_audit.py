"""Issue 5, audit log: one PII-free JSON line per rejected (and, if asked, every) statement.

Statements full of literals (strings, emails, numbers, E'' and dollar-quoted
strings, IN lists, bit/hex strings, comments, client-side interpolated
parameters, unparseable text) go through a real proxy writing its audit log
to a file; the file must have exactly the documented keys and no literal at all.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from support.db import TenantDb
from support.proxy import RunningProxy

pytestmark = pytest.mark.postgres

KEYS = [
    "time",
    "tenant",
    "user",
    "client_addr",
    "session_id",
    "command",
    "fingerprint",
    "normalized",
    "verdict",
    "rule",
    "duration_ms",
    "rows",
]

# (sql, expected verdict, the literals it contains). Every statement is acme's.
STATEMENTS: list[tuple[str, str, list[str]]] = [
    (
        "SELECT id, item FROM orders WHERE tenant_id = 'acme' AND secret = 'acme-secret-1'",
        "allowed",
        ["acme-secret-1"],
    ),
    (
        "SELECT name FROM customers WHERE tenant_id = 'acme' AND email = 'c1@acme.example'",
        "allowed",
        ["c1@acme.example"],
    ),
    (
        "SELECT name FROM customers WHERE email = 'c2@acme.example'",
        "rejected",
        ["c2@acme.example"],
    ),
    (
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND amount > 987654.321",
        "allowed",
        ["987654", "987654.321"],
    ),
    (
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND item = E'zq-esc\\'aped\\x41-lit'",
        "allowed",
        ["zq-esc", "aped", "-lit'"],
    ),
    (
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND item = $tag$dollar quoted 'x'$tag$",
        "allowed",
        ["dollar quoted", "$tag$"],
    ),
    (
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id IN (424242, 535353, 646464)",
        "allowed",
        ["424242", "535353", "646464"],
    ),
    (
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND item = U&'quux\\0041-unilit'",
        "allowed",
        ["quux", "unilit"],
    ),
    (
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND item LIKE 'like-pattern-%'"
        " AND B'10110111' = B'10110111' AND X'DEADBEEF' <> X'CAFEBABE'",
        "allowed",
        ["like-pattern", "10110111", "DEADBEEF", "CAFEBABE"],
    ),
    (
        "SELECT id FROM orders WHERE tenant_id = 'acme' /* comment-secret-xyz */ AND id > 0"
        " -- line-comment-secret\n",
        "allowed",
        ["comment-secret-xyz", "line-comment-secret"],
    ),
    (
        "INSERT INTO customers (tenant_id, name, email)"
        " VALUES ('acme', 'Jane Secretname', 'jane.doe@example.com')",
        "allowed",
        ["Jane Secretname", "jane.doe@example.com"],
    ),
    (
        "UPDATE customers SET email = 'new.addr@example.org'"
        " WHERE tenant_id = 'acme' AND id = 7770777",
        "allowed",
        ["new.addr@example.org", "7770777"],
    ),
    (
        "DELETE FROM customers WHERE tenant_id = 'globex' AND email = 'victim@globex.example'",
        "rejected",
        ["globex", "victim@globex.example"],
    ),
    (
        "SELECT 'error-literal-abc'::int FROM orders WHERE tenant_id = 'acme'",
        "error",
        ["error-literal-abc"],
    ),
    (
        "SELEC 'unparseable-literal-q', 313373 FROM orders",
        "rejected",
        ["unparseable-literal-q", "313373"],
    ),
    (
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND item = 'multi-a';"
        " SELECT id FROM orders WHERE tenant_id = 'acme' AND item = 'multi-b'",
        "allowed",
        ["multi-a", "multi-b"],
    ),
]
# Through psycopg's ClientCursor: the driver inlines the values into the SQL text.
CLIENT_SIDE: list[tuple[str, tuple[Any, ...], list[str]]] = [
    (
        "SELECT id FROM orders WHERE tenant_id = %s AND secret = %s AND amount < %s",
        ("acme", "acme-secret-3", 555551.5),
        ["acme-secret-3", "555551"],
    ),
]
# Server-side parameters: the values never were in the text; they must not appear either.
SERVER_SIDE: list[tuple[str, tuple[Any, ...], list[str]]] = [
    (
        "SELECT id FROM orders WHERE tenant_id = %s AND secret = %s",
        ("acme", "param-secret-value"),
        ["param-secret-value"],
    ),
]


def audited_proxy(db: TenantDb, path: Path, **audit: Any) -> RunningProxy:
    return RunningProxy(db.policy("both", audit={"output": str(path), **audit}))


def read_audit(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    events = [json.loads(line) for line in lines]
    for event in events:
        assert list(event) == KEYS
    return events


def run(conn: psycopg.Connection[Any], sql: str, verdict: str) -> None:
    if verdict == "allowed":
        conn.execute(sql)
    elif verdict == "rejected":
        with pytest.raises(errors.InsufficientPrivilege, match=r"^tenantgate: "):
            conn.execute(sql)
    else:
        with pytest.raises(psycopg.DatabaseError) as info:
            conn.execute(sql)
        assert not str(info.value).startswith("tenantgate")


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.jsonl"


def test_audit_log_has_every_field_and_never_a_literal(
    clean_tenant_db: TenantDb, audit_path: Path
) -> None:
    db = clean_tenant_db
    proxy = audited_proxy(db, audit_path, statements=True)
    user = db.user("acme")
    try:
        with psycopg.connect(proxy.dsn(user.name, user.password), autocommit=True) as conn:
            for sql, verdict, _ in STATEMENTS:
                run(conn, sql, verdict)
            for sql, params, _ in CLIENT_SIDE:
                psycopg.ClientCursor(conn).execute(sql, params)
            for sql, params, _ in SERVER_SIDE:
                conn.execute(sql, params)
    finally:
        proxy.stop()  # writes what is queued
    text = audit_path.read_text(encoding="utf-8")
    events = read_audit(audit_path)

    literals = [lit for *_, lits in (*STATEMENTS, *CLIENT_SIDE, *SERVER_SIDE) for lit in lits]
    normalized = "\n".join(e["normalized"] for e in events).lower()
    for literal in literals:
        assert literal not in text, f"literal {literal!r} leaked into the audit log"
        assert literal.lower() not in normalized, f"literal {literal!r} leaked"
    assert "globex" not in text

    # The rejected statements are all there, with their rule.
    rejected = [e for e in events if e["verdict"] == "rejected"]
    assert [e["rule"] for e in rejected] == [
        "missing_tenant_predicate",
        "wrong_tenant",
        "parse_error",
    ]
    assert rejected[2]["normalized"] == "<unparseable>"
    assert rejected[2]["fingerprint"] == ""
    assert all(e["duration_ms"] is None and e["rows"] is None for e in rejected)
    assert rejected[0]["normalized"] == "SELECT name FROM customers WHERE email = $1"
    assert rejected[1]["command"] == "delete"
    # Every other statement is logged too (statements: true).
    allowed = [e for e in events if e["verdict"] == "allowed"]
    by_sql = {e["normalized"]: e for e in allowed}
    first = by_sql["SELECT id, item FROM orders WHERE tenant_id = $1 AND secret = $2"]
    assert first["command"] == "select"
    assert first["rule"] is None
    assert isinstance(first["duration_ms"], float | int)
    assert first["duration_ms"] >= 0
    inserted = next(e for e in allowed if e["command"] == "insert")
    assert inserted["normalized"] == (
        "INSERT INTO customers (tenant_id, name, email) VALUES ($1, $2, $3)"
    )
    assert any(e["command"] == "update" for e in allowed)
    errored = [e for e in events if e["verdict"] == "error"]
    assert len(errored) >= 1
    assert any("::int" in e["normalized"] for e in errored)
    # Identity fields.
    assert {e["tenant"] for e in events} == {"acme"}
    assert {e["user"] for e in events} == {"acme_app"}
    assert len({e["session_id"] for e in events}) == 1
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", e["client_addr"]) for e in events)
    assert len({e["client_addr"] for e in events}) == 1
    for event in events:
        assert event["time"].endswith("Z")
        datetime.fromisoformat(event["time"].replace("Z", "+00:00"))
        if event["verdict"] != "rejected" or event["rule"] != "parse_error":
            assert re.fullmatch(r"[0-9a-f]{16}", event["fingerprint"]), event
    # Different shapes, different fingerprints.
    assert (
        by_sql["SELECT id, item FROM orders WHERE tenant_id = $1 AND secret = $2"]["fingerprint"]
        != by_sql["SELECT id FROM orders WHERE tenant_id = $1 AND secret = $2"]["fingerprint"]
    )
    client_side = [
        e
        for e in allowed
        if e["normalized"]
        == "SELECT id FROM orders WHERE tenant_id = $1 AND secret = $2 AND amount < $3"
    ]
    assert len(client_side) == 1
    assert "SELECT id FROM orders WHERE tenant_id = $1 AND id IN ($2, $3, $4)" in by_sql
    server_side = by_sql["SELECT id FROM orders WHERE tenant_id = $1 AND secret = $2"]
    assert server_side["rows"] == 0  # extended protocol: rows exactly as the server counted


def test_same_shape_same_fingerprint(tenant_db: TenantDb, audit_path: Path) -> None:
    proxy = audited_proxy(tenant_db, audit_path)
    user = tenant_db.user("globex")
    try:
        with psycopg.connect(proxy.dsn(user.name, user.password), autocommit=True) as conn:
            for email in ("a@x.example", "b@y.example", "c@z.example"):
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute(f"SELECT * FROM customers WHERE email = '{email}'")
    finally:
        proxy.stop()
    events = read_audit(audit_path)
    assert len(events) == 3
    assert len({e["fingerprint"] for e in events}) == 1
    assert {e["normalized"] for e in events} == {"SELECT * FROM customers WHERE email = $1"}
    assert "example" not in audit_path.read_text()


def test_only_rejections_by_default(tenant_db: TenantDb, audit_path: Path) -> None:
    proxy = audited_proxy(tenant_db, audit_path)  # statements: false
    try:
        for tenant in ("acme", "globex"):
            user = tenant_db.user(tenant)
            with psycopg.connect(proxy.dsn(user.name, user.password), autocommit=True) as conn:
                for _ in range(3):
                    conn.execute(f"SELECT id FROM orders WHERE tenant_id = '{tenant}'")
                with pytest.raises(psycopg.DataError):
                    conn.execute("SELECT 'x'::int")
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute("SELECT * FROM orders")
                with pytest.raises(errors.InsufficientPrivilege):
                    conn.execute("SELECT pg_sleep(1)")
    finally:
        proxy.stop()
    events = read_audit(audit_path)
    assert [(e["tenant"], e["verdict"], e["rule"]) for e in events] == [
        ("acme", "rejected", "missing_tenant_predicate"),
        ("acme", "rejected", "denied_function"),
        ("globex", "rejected", "missing_tenant_predicate"),
        ("globex", "rejected", "denied_function"),
    ]
    assert events[0]["session_id"] != events[2]["session_id"]


def test_dry_run_logs_would_reject(tenant_db: TenantDb, audit_path: Path) -> None:
    proxy = RunningProxy(tenant_db.policy("both", dry_run=True, audit={"output": str(audit_path)}))
    user = tenant_db.user("acme")
    try:
        with psycopg.connect(proxy.dsn(user.name, user.password), autocommit=True) as conn:
            conn.execute("SELECT * FROM orders WHERE secret <> 'dry-run-secret'").fetchall()
    finally:
        proxy.stop()
    events = read_audit(audit_path)
    assert [(e["verdict"], e["rule"]) for e in events] == [
        ("would_reject", "missing_tenant_predicate")
    ]
    assert "dry-run-secret" not in audit_path.read_text()


def test_one_line_per_rejected_extended_statement(tenant_db: TenantDb, audit_path: Path) -> None:
    proxy = audited_proxy(tenant_db, audit_path, statements=True)
    user = tenant_db.user("acme")
    try:
        with psycopg.connect(proxy.dsn(user.name, user.password), autocommit=True) as conn:
            conn.execute("SELECT id FROM orders WHERE tenant_id = %s", ("acme",)).fetchall()
            with pytest.raises(errors.InsufficientPrivilege, match="missing_tenant_predicate"):
                conn.execute("SELECT * FROM customers WHERE email = %s", ("x@y.example",))
            conn.execute("SELECT id FROM orders WHERE tenant_id = %s", ("acme",)).fetchall()
    finally:
        proxy.stop()
    events = read_audit(audit_path)
    assert [(e["verdict"], e["rule"], e["normalized"]) for e in events] == [
        ("allowed", None, "SELECT id FROM orders WHERE tenant_id = $1"),
        ("rejected", "missing_tenant_predicate", "SELECT * FROM customers WHERE email = $1"),
        ("allowed", None, "SELECT id FROM orders WHERE tenant_id = $1"),
    ]


def test_rate_limited_statement_is_described(tenant_db: TenantDb, audit_path: Path) -> None:
    proxy = RunningProxy(
        tenant_db.policy(
            "both",
            audit={"output": str(audit_path)},
            limits={"rate_limit_max_delay_ms": 0},
            tenants={"acme": {"limits": {"queries_per_second": 1}}},
        )
    )
    user = tenant_db.user("acme")
    try:
        with psycopg.connect(proxy.dsn(user.name, user.password), autocommit=True) as conn:
            conn.execute("SELECT id FROM orders WHERE tenant_id = 'acme'")
            with pytest.raises(psycopg.Error, match="rate limit exceeded"):
                conn.execute("SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 42")
    finally:
        proxy.stop()
    (event,) = read_audit(audit_path)
    assert (event["verdict"], event["rule"]) == ("rejected", "rate_limit")
    assert event["command"] == "select"
    assert event["normalized"] == "SELECT id FROM orders WHERE tenant_id = $1 AND id = $2"
