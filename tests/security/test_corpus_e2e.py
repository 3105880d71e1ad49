"""The data-file corpus (tests/corpus) end-to-end through the real proxy.

Adversarial cases run as tenant ``acme`` while acme, globex and initech hold
data, over the simple and the extended protocol, in ``both`` mode, in
``enforce`` mode (upstream role with BYPASSRLS: the analyser is the only
barrier) and in ``rls`` mode (no predicate proof: RLS is the backstop).  Each
case runs inside ``BEGIN`` ... ``ROLLBACK``.  Checked:

* every case the analyser rejects in that mode is answered with SQLSTATE 42501,
  a ``tenantgate:`` message and a HINT, and the connection stays usable;
* nothing any statement returns (rows, command tags, errors with every field,
  notices) contains another tenant's seed values, and no result row carries
  another tenant's id;
* afterwards globex's and initech's rows are byte-identical.

Legitimate cases run in ``both`` mode (legit_rls_mode.yaml in ``rls`` mode):
none may be rejected by tenantgate; normal SQL errors are counted apart.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pytest
from security_support import (
    OTHER_TENANTS,
    TENANT,
    LibpqClient,
    Outcome,
    RawClient,
    errors_of,
    expected_verdict,
    foreign_rows,
    leaks,
    legitimate,
    load_corpus,
    texts_of,
)
from security_support import (
    adversarial as adversarial_cases,
)

from support.db import TenantDb
from support.proxy import RunningProxy
from tenantgate.protocol.frontend import Bind, Execute, Parse, Query, Sync

pytestmark = [pytest.mark.security]

CASES = load_corpus()
ADVERSARIAL = adversarial_cases(CASES)
LEGITIMATE = legitimate(CASES)


def _has_nul(sql: str, params: tuple[str | None, ...] | None) -> bool:
    return "\x00" in sql or any(p is not None and "\x00" in p for p in params or ())


@dataclass
class Tally:
    mode: str
    protocol: str
    run: int = 0
    rejected: int = 0
    allowed_ok: int = 0
    allowed_sql_error: int = 0
    skipped: int = 0
    failures: list[str] = field(default_factory=list)
    leaks: list[str] = field(default_factory=list)
    sql_errors: Counter[str] = field(default_factory=Counter)
    sql_error_cases: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.mode}/{self.protocol}: run={self.run} rejected={self.rejected} "
            f"allowed_ok={self.allowed_ok} allowed_sql_error={self.allowed_sql_error} "
            f"skipped={self.skipped} leaks={len(self.leaks)} failures={len(self.failures)}"
        )


def _check_leaks(
    tally: Tally, label: str, outcome: Outcome, sql: str, params: tuple[str | None, ...]
) -> None:
    found = leaks("\n".join(outcome.texts), sql, params)
    if found:
        tally.leaks.append(f"{label}: markers {found} in {outcome.texts[:20]!r}")
    spelled = sql.lower()
    for row in foreign_rows(outcome):
        if not any(t in spelled and t in (v or "") for t in OTHER_TENANTS for v in row):
            tally.leaks.append(f"{label}: other tenant's row {row!r}")


def _run_case(
    client: LibpqClient,
    tally: Tally,
    label: str,
    sql: str,
    params: tuple[str | None, ...],
    expected: str,
) -> None:
    # BEGIN/ROLLBACK go as simple Queries (as psycopg and asyncpg send them), so a
    # false rejection of the ROLLBACK (test_drivers.py) cannot derail the corpus run.
    begin = client.simple("BEGIN")
    outcome = client.run(sql, params, tally.protocol)
    rollback = client.simple("ROLLBACK")
    tally.run += 1
    for part in (begin, outcome, rollback):
        _check_leaks(tally, label, part, sql, params)
    if outcome.rejected:
        error = outcome.error or {}
        tally.rejected += 1
        if not error.get("H"):
            tally.failures.append(f"{label}: rejection without HINT: {error}")
        if expected != "rejected":
            tally.failures.append(f"{label}: rejected but the analyser allows it: {error}")
    elif expected == "rejected":
        tally.failures.append(
            f"{label}: expected a tenantgate rejection, got "
            f"{outcome.error or 'success'} rows={outcome.rows[:3]!r}"
        )
    elif outcome.error is not None:
        tally.allowed_sql_error += 1
        tally.sql_errors[f"{outcome.error.get('C')} {outcome.error.get('M')}"] += 1
        tally.sql_error_cases.append(label)
    else:
        tally.allowed_ok += 1
    if begin.error is not None or (rollback.error is not None and not outcome.errors):
        tally.failures.append(f"{label}: BEGIN/ROLLBACK failed: {begin.error} {rollback.error}")
    if not client.usable():
        tally.failures.append(f"{label}: connection not usable afterwards")
        client.reconnect()


def _run_adversarial(proxy: RunningProxy, db: TenantDb, mode: str, protocol: str) -> Tally:
    tally = Tally(mode, protocol)
    user = db.user(TENANT)
    with LibpqClient(proxy.dsn(user.name, user.password)) as client:
        for case in ADVERSARIAL:
            params = case.params or ()
            if (protocol == "simple" and case.params is not None) or _has_nul(
                case.sql, case.params
            ):
                tally.skipped += 1  # $n needs Bind; NUL bytes: test_nul_bytes_raw
                continue
            _run_case(client, tally, case.id, case.sql, params, expected_verdict(case, mode))
    return tally


def _report(tally: Tally) -> None:
    print("\n" + tally.summary())
    for error, count in tally.sql_errors.most_common():
        print(f"    {count} x {error}")
    if tally.sql_error_cases:
        print("    normal SQL errors in: " + ", ".join(tally.sql_error_cases))
    problems = tally.leaks + tally.failures
    assert not problems, tally.summary() + "\n" + "\n".join(problems[:60])


PROTOCOLS = ["simple", "extended"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_adversarial_both_mode(
    proxy_both: RunningProxy, clean_tenant_db: TenantDb, protocol: str, security_db: TenantDb
) -> None:
    before = {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS}
    tally = _run_adversarial(proxy_both, clean_tenant_db, "both", protocol)
    assert {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS} == before
    _report(tally)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_adversarial_enforce_mode_without_rls(
    proxy_enforce: RunningProxy, clean_tenant_db: TenantDb, protocol: str
) -> None:
    before = {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS}
    tally = _run_adversarial(proxy_enforce, clean_tenant_db, "enforce", protocol)
    assert {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS} == before
    _report(tally)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_adversarial_rls_mode(
    proxy_rls: RunningProxy, clean_tenant_db: TenantDb, protocol: str
) -> None:
    before = {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS}
    tally = _run_adversarial(proxy_rls, clean_tenant_db, "rls", protocol)
    assert {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS} == before
    _report(tally)


# --- NUL bytes: libpq would cut the text at the NUL, so send the exact bytes ----------


def _nul_cases() -> list[tuple[str, str, tuple[str | None, ...] | None]]:
    return [(c.id, c.sql, c.params) for c in ADVERSARIAL if _has_nul(c.sql, c.params)]


@pytest.mark.parametrize(("case_id", "sql", "params"), _nul_cases(), ids=lambda v: str(v)[:30])
@pytest.mark.parametrize("mode", ["both", "enforce"])
def test_nul_bytes_raw(
    proxy_both: RunningProxy,
    proxy_enforce: RunningProxy,
    clean_tenant_db: TenantDb,
    mode: str,
    case_id: str,
    sql: str,
    params: tuple[str | None, ...] | None,
) -> None:
    """A NUL inside a Query/Parse text ends the session (malformed message); inside a
    Bind value it is a 42501 rejection.  Either way nothing reaches the data."""
    proxy = proxy_both if mode == "both" else proxy_enforce
    before = {t: clean_tenant_db.snapshot(t) for t in (TENANT, *OTHER_TENANTS)}
    user = clean_tenant_db.user(TENANT)
    raw_params = tuple(None if p is None else p.encode() for p in params or ())
    for protocol in ("simple", "extended"):
        if protocol == "simple" and params is not None:
            continue
        with RawClient(proxy.host, proxy.port) as client:
            client.login(user.name, user.password, clean_tenant_db.database)
            if protocol == "simple":
                message = b"Q" + _frame_len(sql.encode() + b"\x00") + sql.encode() + b"\x00"
            elif "\x00" in sql:
                body = b"\x00" + sql.encode() + b"\x00" + b"\x00\x00"
                message = b"P" + _frame_len(body) + body
            else:
                message = Parse("", sql).encode()
            client.send(
                message,
                Bind("", "", (), raw_params, ()).encode(),
                Execute("", 0).encode(),
                Sync().encode(),
            )
            try:
                replies = client.read_until_ready()
            except ConnectionError:
                continue  # the proxy ended the session: acceptable, checked below
            errors = errors_of(replies)
            if any(e.get("V") == "FATAL" for e in errors):
                continue
            assert errors, f"{case_id}: {protocol}: accepted {replies!r}"
            assert errors[0]["C"] == "42501", errors
            assert errors[0]["M"].startswith("tenantgate:"), errors
            assert not leaks("\n".join(texts_of(replies)), sql, params or ())
            assert client.simple("SELECT 1")[-1][0] == b"Z"
    assert {t: clean_tenant_db.snapshot(t) for t in (TENANT, *OTHER_TENANTS)} == before


def _frame_len(body: bytes) -> bytes:
    return (len(body) + 4).to_bytes(4, "big")


# --- legitimate corpus --------------------------------------------------------------------


def _run_legitimate(proxy: RunningProxy, db: TenantDb, mode: str, protocol: str) -> Tally:
    tally = Tally(mode, protocol)
    user = db.user(TENANT)
    wanted = [c for c in LEGITIMATE if (c.mode == "rls") == (mode == "rls")]
    with LibpqClient(proxy.dsn(user.name, user.password)) as client:
        for case in wanted:
            if protocol == "simple" and case.params is not None:
                tally.skipped += 1
                continue
            _run_case(client, tally, case.id, case.sql, case.params or (), "allowed")
    return tally


@pytest.mark.parametrize(
    ("mode", "protocol"),
    [("both", "simple"), ("both", "extended"), ("rls", "simple"), ("rls", "extended")],
)
def test_legitimate_corpus(
    proxy_both: RunningProxy,
    proxy_rls: RunningProxy,
    clean_tenant_db: TenantDb,
    mode: str,
    protocol: str,
) -> None:
    proxy = proxy_both if mode == "both" else proxy_rls
    before = {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS}
    tally = _run_legitimate(proxy, clean_tenant_db, mode, protocol)
    assert {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS} == before
    _report(tally)
    assert tally.rejected == 0


def test_query_message_encoder_matches() -> None:
    """The raw NUL test frames Query by hand; check the framing against the encoder."""
    text = "SELECT 1"
    body = text.encode() + b"\x00"
    assert b"Q" + _frame_len(body) + body == Query(text).encode()
