"""Unit tests per rule and per helper of tenantgate.analysis."""

from __future__ import annotations

import struct
import uuid

import pytest
from analysis_corpus import POLICY, RLS_POLICY

from tenantgate.analysis import (
    Analysis,
    AnalysisCache,
    AnalysisPolicy,
    analyse_sql,
    check_tenant,
    explain_verdict,
    fingerprint,
    normalize,
    tenant_param_matches,
)


def rule(sql: str, policy: AnalysisPolicy = POLICY, tenant: str = "acme") -> str | None:
    rejection = check_tenant(analyse_sql(sql, policy), tenant)
    return None if rejection is None else rejection.rule


# ----------------------------------------------------------------- API shape
def test_empty_query_is_empty_analysis() -> None:
    assert analyse_sql("", POLICY) == Analysis((), None)
    assert analyse_sql("  ;  ; -- nothing\n", POLICY) == Analysis((), None)


def test_locations_are_utf8_byte_offsets() -> None:
    sql = "select 'é' ; select 1; select 'ü'"
    statements = analyse_sql(sql, POLICY).statements
    raw = sql.encode()
    assert [s.location for s in statements] == [0, 14, 24]
    assert (
        raw[statements[1].location : statements[1].location + statements[1].length] == b"select 1"
    )
    tail = raw[statements[2].location :].strip()
    assert statements[2].length == 0 or tail == "select 'ü'".encode()


def test_statement_fields() -> None:
    analysis = analyse_sql(
        "BEGIN; SELECT * FROM orders WHERE tenant_id = $2 LIMIT $3; "
        "SET LOCAL statement_timeout = '2s'; COMMIT AND CHAIN; SAVEPOINT a; "
        "RELEASE a; ROLLBACK TO a; ROLLBACK",
        POLICY,
    )
    assert analysis.rejection is None
    s = analysis.statements
    assert [x.transaction for x in s] == [
        "begin",
        None,
        None,
        "commit",
        "savepoint",
        "release",
        "rollback_to",
        "rollback",
    ]
    assert s[1].command == "select"
    assert s[1].tag == "SELECT"
    assert s[1].tenant_params == frozenset({2})
    assert s[1].param_count == 3
    assert s[2].statement_timeout_ms == 2000
    assert s[2].tag == "SET"


@pytest.mark.parametrize(
    ("sql", "command", "tag"),
    [
        ("INSERT INTO orders (tenant_id, item) VALUES ('acme', 'x')", "insert", "INSERT"),
        ("UPDATE orders SET item = 'x' WHERE tenant_id = 'acme'", "update", "UPDATE"),
        ("DELETE FROM orders WHERE tenant_id = 'acme'", "delete", "DELETE"),
        ("VALUES (1)", "select", "SELECT"),
        ("SHOW ALL", "other", "SHOW"),
        ("EXPLAIN SELECT 1", "other", "EXPLAIN"),
        ("COPY (SELECT 1) TO STDOUT", "other", "COPY"),
        ("START TRANSACTION", "other", "START TRANSACTION"),
        ("END", "other", "COMMIT"),
        ("RESET lock_timeout", "other", "RESET"),
    ],
)
def test_command_and_tag(sql: str, command: str, tag: str) -> None:
    analysis = analyse_sql(sql, POLICY)
    assert analysis.rejection is None
    assert (analysis.statements[0].command, analysis.statements[0].tag) == (command, tag)


def test_rejection_messages_never_echo_literals() -> None:
    secret = "s3cr3t-Value"
    for sql in (
        f"SELECT * FROM orders WHERE secret = '{secret}'",
        f"SELECT set_config('x', '{secret}', false)",
        f"SET app.tenant_id = '{secret}'",
        f"SELECT * FROM orders WHERE tenant_id = '{secret}'",
        f"SELECT '{secret}",
        f"SELECT 1 FROM WHERE '{secret}'",
        f"SET statement_timeout = '{secret}'",
    ):
        rejection = check_tenant(analyse_sql(sql, POLICY), "acme")
        assert rejection is not None
        assert secret not in rejection.message
        assert secret not in rejection.hint


def test_partial_statements_on_rejection() -> None:
    analysis = analyse_sql("SELECT 1; TRUNCATE orders; SELECT 2", POLICY)
    assert analysis.rejection is not None
    assert analysis.rejection.rule == "statement_class"
    assert len(analysis.statements) == 1
    assert "TRUNCATE" in analysis.rejection.message


# --------------------------------------------------------------- predicates
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM orders WHERE tenant_id = '42'::int4",
        "SELECT * FROM orders WHERE tenant_id = 42",
        "SELECT * FROM orders WHERE tenant_id = '042'::integer",
    ],
)
def test_integer_tenants(sql: str) -> None:
    assert rule(sql, tenant="42") is None
    assert rule(sql, tenant="acme") == "wrong_tenant"


def test_uuid_tenant_canonicalised() -> None:
    tenant = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
    sql = "SELECT * FROM orders WHERE tenant_id = '{A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11}'::uuid"
    assert rule(sql, tenant=tenant) is None
    assert (
        rule("SELECT * FROM orders WHERE tenant_id = 'nope'::uuid", tenant=tenant)
        == "missing_tenant_predicate"
    )


def test_tenant_constants_recorded_per_statement() -> None:
    analysis = analyse_sql(
        "SELECT * FROM orders o JOIN customers c ON c.tenant_id = 'acme' WHERE o.tenant_id = $1",
        POLICY,
    )
    assert analysis.statements[0].tenant_constants == frozenset({"acme"})
    assert analysis.statements[0].tenant_params == frozenset({1})


def test_unqualified_column_only_with_single_entry() -> None:
    assert rule("SELECT * FROM orders WHERE tenant_id = 'acme'") is None
    assert (
        rule("SELECT * FROM orders, plans WHERE tenant_id = 'acme'") == "missing_tenant_predicate"
    )
    assert (
        rule("UPDATE orders SET item = 'x' FROM plans WHERE tenant_id = 'acme'")
        == "missing_tenant_predicate"
    )


def test_schema_qualified_column_reference() -> None:
    assert rule("SELECT * FROM billing.invoices WHERE billing.invoices.tenant_id = 'acme'") is None
    assert rule("SELECT * FROM billing.invoices WHERE invoices.tenant_id = 'acme'") is None
    assert (
        rule("SELECT * FROM billing.invoices i WHERE billing.invoices.tenant_id = 'acme'")
        == "missing_tenant_predicate"
    )


# -------------------------------------------------------------- relations
def test_unknown_tables_allowed_by_policy() -> None:
    allow = AnalysisPolicy(
        scoped_tables=POLICY.scoped_tables,
        shared_tables=POLICY.shared_tables,
        unknown_tables="allow",
    )
    assert rule("SELECT * FROM audit_log", allow) is None
    assert rule("UPDATE audit_log SET msg = 'x'", allow) is None
    assert rule("SELECT * FROM pg_stat_activity", allow) == "catalog_view"
    assert rule("SELECT * FROM public.pg_stat_statements", allow) == "catalog_view"
    assert rule("SELECT * FROM pg_sequences", allow) == "catalog_view"
    assert rule("SELECT * FROM pg_whatever", allow) == "catalog_view"
    assert rule("SELECT * FROM invoices", allow) == "missing_tenant_predicate"


def test_catalog_names_win_over_policy() -> None:
    odd = AnalysisPolicy(scoped_tables={"pg_class": "tenant_id"}, shared_tables=frozenset())
    assert rule("SELECT * FROM pg_class", odd) is None


def test_policy_keys_with_public_schema() -> None:
    pol = AnalysisPolicy(
        scoped_tables={"public.orders": "tenant_id"}, shared_tables=frozenset({"public.plans"})
    )
    assert rule("SELECT * FROM orders", pol) == "missing_tenant_predicate"
    assert rule("SELECT * FROM public.orders WHERE tenant_id = 'acme'", pol) is None
    assert rule("SELECT * FROM plans", pol) is None
    assert rule("DELETE FROM plans", pol) == "shared_table_write"


def test_other_tenant_column_name() -> None:
    pol = AnalysisPolicy(scoped_tables={"orders": "org"}, shared_tables=frozenset())
    assert rule("SELECT * FROM orders WHERE org = 'acme'", pol) is None
    assert rule("SELECT * FROM orders WHERE tenant_id = 'acme'", pol) == "missing_tenant_predicate"


# -------------------------------------------------------------- functions
def test_function_policy_adjustments() -> None:
    pol = AnalysisPolicy(
        scoped_tables=POLICY.scoped_tables,
        shared_tables=POLICY.shared_tables,
        allowed_functions=frozenset({"pg_sleep"}),
        denied_functions=frozenset({"my_leaky_fn", "pg_typeof"}),
    )
    assert rule("SELECT pg_sleep(0)", pol) is None
    assert rule("SELECT public.My_Leaky_Fn()", pol) == "denied_function"
    assert rule("SELECT pg_typeof(1)", pol) == "denied_function"
    assert rule("SELECT pg_sleep(0)") == "denied_function"
    assert rule("SELECT my_leaky_fn()") is None


@pytest.mark.parametrize(
    "fn",
    [
        "pg_typeof(1)",
        "pg_get_expr(NULL, 0)",
        "pg_backend_pid()",
        "pg_table_is_visible(0)",
        "pg_collation_for('x')",
        "format_type(23, NULL)",
        "extract(year from now())",
        "obj_description(0, 'pg_class')",
        "current_setting('x', true)",
    ],
)
def test_allowed_functions(fn: str) -> None:
    assert rule(f"SELECT {fn}") is None


# ---------------------------------------------------------------- rls mode
def test_rls_mode_skips_proofs_only() -> None:
    assert rule("SELECT * FROM orders", RLS_POLICY) is None
    assert rule("SELECT * FROM orders WHERE tenant_id = 'globex'", RLS_POLICY) is None
    assert rule("SELECT set_config('a', 'b', true)", RLS_POLICY) == "denied_function"
    analysis = analyse_sql("SELECT * FROM orders WHERE tenant_id = $1", RLS_POLICY)
    assert analysis.statements[0].tenant_params == frozenset()


def test_tenant_setting_from_policy() -> None:
    pol = AnalysisPolicy(scoped_tables={}, shared_tables=frozenset(), tenant_setting="x.org")
    assert rule("SET x.org = 'a'", pol) == "setting_change"
    assert rule("SET app.tenant_id = 'a'", pol) == "setting_change"


# ------------------------------------------------------------ statement_timeout
@pytest.mark.parametrize(
    ("value", "ms"),
    [
        ("5000", 5000),
        ("'5000'", 5000),
        ("'5s'", 5000),
        ("'5 s'", 5000),
        ("'1.5s'", 1500),
        ("'2min'", 120000),
        ("'1h'", 3600000),
        ("'1d'", 86400000),
        ("'1500us'", 2),
        ("'100ms'", 100),
        ("0", 0),
        ("1.5", 2),
        ("DEFAULT", None),
    ],
)
def test_statement_timeout_values(value: str, ms: int | None) -> None:
    analysis = analyse_sql(f"SET statement_timeout = {value}", POLICY)
    assert analysis.rejection is None
    assert analysis.statements[0].statement_timeout_ms == ms


def test_reset_statement_timeout_reports_nothing() -> None:
    # RESET returns to the session default (the tenant limit from the startup packet).
    assert analyse_sql("RESET statement_timeout", POLICY).statements[0].statement_timeout_ms is None
    idle = analyse_sql("SET idle_in_transaction_session_timeout = 0", POLICY).statements[0]
    assert idle.idle_in_transaction_timeout_ms == 0
    assert analyse_sql("SET lock_timeout = 5", POLICY).statements[0].statement_timeout_ms is None


# ------------------------------------------------------------------ params
TENANT_UUID = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"


@pytest.mark.parametrize(
    ("value", "binary", "oid", "tenant", "expected"),
    [
        (b"acme", False, 0, "acme", True),
        (b"acme", False, 25, "acme", True),
        (b"acme", False, 1043, "acme", True),
        (b"globex", False, 0, "acme", False),
        (b"ACME", False, 25, "acme", False),
        (None, False, 25, "acme", False),
        (b"\xff", False, 25, "acme", False),
        (b"acme", False, 19, "acme", False),
        (b"acme", False, 1042, "acme", False),
        (b" 42", False, 23, "42", True),
        (b"042", False, 20, "42", True),
        (b"042", False, 25, "42", False),
        (TENANT_UUID.upper().encode(), False, 2950, TENANT_UUID, True),
        (b"acme", True, 25, "acme", True),
        (b"acme", True, 1043, "acme", True),
        (b"acme\x00", True, 25, "acme", False),
        (uuid.UUID(TENANT_UUID).bytes, True, 2950, TENANT_UUID, True),
        (uuid.UUID(TENANT_UUID).bytes, True, 2950, "acme", False),
        (struct.pack(">i", 42), True, 23, "42", True),
        (struct.pack(">q", 42), True, 20, "42", True),
        (struct.pack(">h", 42), True, 21, "42", True),
        (struct.pack(">i", -7), True, 23, "-7", True),
        (struct.pack(">i", 42), True, 20, "42", False),
        (struct.pack(">i", 42), True, 0, "42", True),
        (uuid.UUID(TENANT_UUID).bytes, True, 0, TENANT_UUID, True),
        (b"acme", True, 0, "acme", False),
        (b"acmecorp", True, 0, "acmecorp", False),
        (b"globex-longer", True, 0, "globex-longer", True),
        (None, True, 23, "42", False),
    ],
)
def test_tenant_param_matches(
    value: bytes | None, binary: bool, oid: int, tenant: str, expected: bool
) -> None:
    assert tenant_param_matches(value, binary, oid, tenant) is expected


# ------------------------------------------------------------------- cache
def test_cache_hits_misses_and_lru() -> None:
    cache = AnalysisCache(POLICY, maxsize=2)
    first = cache.get_or_analyse("SELECT 1")
    assert cache.get_or_analyse("SELECT 1") is first
    cache.get_or_analyse("SELECT 2")
    cache.get_or_analyse("SELECT 1")
    cache.get_or_analyse("SELECT 3")  # evicts SELECT 2
    assert (cache.hits, cache.misses, len(cache)) == (2, 3, 2)
    cache.get_or_analyse("SELECT 2")
    assert cache.misses == 4
    with pytest.raises(ValueError):
        AnalysisCache(POLICY, maxsize=0)


# --------------------------------------------------------- normalize, fingerprint
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM orders WHERE secret = 'p@ss' -- 'c0mment'\n AND id = 4242",
        "SELECT E'\\x70@ss', $$p@ss$$, $t$p@ss$t$, U&'p@ss', B'1011', X'BEEF', 1.25e3 /* p@ss */",
        "COPY (SELECT 1) TO STDOUT (FORMAT csv, DELIMITER '|')",
        "PREPARE q AS SELECT 'p@ss'",
        "CREATE TABLE t (a text DEFAULT 'p@ss')",
        "SET app.tenant_id = 'p@ss'",
        "SELECT 'p@ss'\n'w0rd'",
    ],
)
def test_normalize_removes_every_literal(sql: str) -> None:
    out = normalize(sql)
    for needle in ("p@ss", "w0rd", "c0mment", "4242", "BEEF", "1011", "1.25e3", "'|'"):
        assert needle not in out, out
    assert out != "<unparseable>"


def test_normalize_numbers_after_existing_params() -> None:
    assert normalize("SELECT $1, 'x', 2") == "SELECT $1, $2, $3"
    assert normalize("SELECT 'unterminated") == "<unparseable>"
    assert normalize("SELECT 1\x00") == "<unparseable>"


def test_fingerprint() -> None:
    assert fingerprint("SELECT * FROM orders WHERE id = 1") == fingerprint(
        "select * from orders where id = 2"
    )
    assert fingerprint("SELECT (") == ""
    assert all(c in "0123456789abcdef" for c in fingerprint("SELECT 1"))


def test_explain_verdict_text() -> None:
    text = explain_verdict(analyse_sql("SELECT * FROM orders WHERE tenant_id = $1", POLICY), "acme")
    assert text.startswith("allowed")
    assert "$1" in text
    text = explain_verdict(analyse_sql("SELECT * FROM orders", POLICY), "acme")
    assert "missing_tenant_predicate" in text
    assert "hint:" in text


def test_deep_nesting_fails_closed() -> None:
    sql = "SELECT " + "(" * 2000 + "1" + ")" * 2000
    analysis = analyse_sql(sql, POLICY)
    assert analysis.rejection is None or analysis.rejection.rule in (
        "parse_error",
        "unsupported_construct",
    )
    deep = "SELECT 1 FROM orders WHERE tenant_id = 'acme' AND id IN (" * 60 + "SELECT 1" + ")" * 60
    assert analyse_sql(deep, POLICY).rejection is None


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "set_transaction"),
        ("SET TRANSACTION READ ONLY", "set_transaction"),
        ("SET transaction_isolation = 'repeatable read'", "set_transaction"),
        ("SET LOCAL transaction_read_only = on", "set_transaction"),
        ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", None),
        ("SET application_name = 'x'", None),
    ],
)
def test_set_transaction_is_reported_for_injection(sql: str, kind: str | None) -> None:
    """rls injection must not precede these: they must be the transaction's first query."""
    analysis = analyse_sql(sql, POLICY)
    assert analysis.rejection is None
    assert analysis.statements[0].transaction == kind
