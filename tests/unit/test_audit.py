"""audit: event format, no literal ever reaches the log, bounded non-blocking queue."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import time
from pathlib import Path
from typing import TypedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tenantgate.audit import (
    MAX_NORMALIZED_CHARS,
    AuditEvent,
    AuditLog,
    event_for,
    format_event,
)
from tenantgate.errors import ConfigError

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


class Session(TypedDict):
    tenant: str
    user: str
    client_addr: str
    session_id: str


SESSION = Session(tenant="acme", user="acme_app", client_addr="127.0.0.1:50000", session_id="s-1")
# Each statement contains literal data that must never reach the log: every
# string made of "Secret"/"4242..." below is such a value.
LEAKY = [
    "SELECT * FROM orders WHERE email = 'alice.Secret@example.com'",
    "SELECT * FROM orders WHERE card = 4242424242424242",
    "SELECT * FROM orders WHERE amount > 42424.4242e3",
    "SELECT E'Secret\\n\\'quoted\\'' AS x",
    "SELECT U&'Secret\\0041' AS x",
    "SELECT $tag$ Secret 'inside' $tag$ AS x",
    "SELECT $$Secret$$",
    "SELECT 1 /* patient: Secret Smith */ FROM orders -- ssn 4242-42-4242 Secret",
    "SELECT * FROM orders WHERE id IN (4242001, 4242002, 4242003) AND note = 'Secret'",
    "INSERT INTO orders (tenant_id, note) VALUES ('acme', 'Secret'), ('acme', 'Secret2')",
    "UPDATE orders SET note = 'Secret' WHERE id = 424242",
    "SELECT B'10101010101010101', X'DEADBEEF4242'",
    "SELECT '{\"ssn\": \"Secret\"}'::jsonb -> 'ssn'",
    "SELECT interval '4242 days', date '2042-04-24'",
    "PREPARE p AS SELECT * FROM orders WHERE note = 'Secret'",
    "SELECT 'Secret' ; SELECT 4242424242",
    "SELECT * FROM orders WHERE note LIKE 'Secret%' ESCAPE '!'",
]
UNPARSEABLE = [
    "SELEC * FROM orders WHERE note = 'Secret'",
    "SELECT 'Secret",
    "SELECT * FROM orders WHERE x = $$Secret",
    "totally Secret not sql 4242424242",
    "SELECT 'Secret'\x00",
]
MARKERS = re.compile(r"Secret|4242|42424|DEADBEEF|2042|10101010|ssn", re.IGNORECASE)


def event(verdict: str = "rejected", **kw: object) -> AuditEvent:
    base: dict[str, object] = {
        "time": 1_700_000_000.1234,
        **SESSION,
        "command": "select",
        "fingerprint": "abc",
        "normalized": "SELECT $1",
        "verdict": verdict,
        "rule": "missing_tenant_predicate" if verdict != "allowed" else None,
        "duration_ms": None,
        "rows": None,
    }
    base.update(kw)
    return AuditEvent(**base)  # type: ignore[arg-type]


# --- event + format --------------------------------------------------------------------


def test_event_is_frozen_with_slots() -> None:
    e = event()
    assert not hasattr(e, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.tenant = "globex"  # type: ignore[misc]
    assert [f.name for f in dataclasses.fields(AuditEvent)] == KEYS


def test_format_is_one_json_object_with_exactly_the_fields() -> None:
    line = format_event(event("allowed", duration_ms=1.23456, rows=7))
    assert "\n" not in line
    data = json.loads(line)
    assert list(data) == KEYS
    assert data["time"] == "2023-11-14T22:13:20.123Z"
    assert data["duration_ms"] == 1.235
    assert data["rows"] == 7
    assert data["rule"] is None
    assert data["verdict"] == "allowed"


def test_format_handles_odd_text() -> None:
    line = format_event(event(user='we"ird\nuser\u00e9', client_addr="[::1]:5"))
    assert json.loads(line)["user"] == 'we"ird\nuser\u00e9'
    assert "\n" not in line


def test_event_for_fingerprints_and_normalizes() -> None:
    a = event_for(
        "SELECT * FROM orders WHERE id = 1", **SESSION, command="select", verdict="allowed"
    )
    b = event_for(
        "select *  from orders where id = 999", **SESSION, command="select", verdict="allowed"
    )
    assert a.fingerprint == b.fingerprint != ""
    assert a.normalized == "SELECT * FROM orders WHERE id = $1"
    assert a.tenant == "acme"
    assert a.rule is None
    assert abs(a.time - time.time()) < 60
    c = event_for(
        "SELECT $1, 5",
        **SESSION,
        command="select",
        verdict="rejected",
        rule="r",
        duration_ms=2.0,
        rows=0,
        time=5.0,
    )
    assert c.normalized == "SELECT $1, $2"
    assert (c.rule, c.duration_ms, c.rows, c.time) == ("r", 2.0, 0, 5.0)
    with pytest.raises(ValueError, match="verdict"):
        event_for("SELECT 1", **SESSION, command="select", verdict="ok")


@pytest.mark.parametrize("sql", LEAKY)
def test_no_literal_reaches_the_log(sql: str) -> None:
    e = event_for(sql, **SESSION, command="select", verdict="rejected", rule="r")
    line = format_event(e)
    assert e.fingerprint
    assert not MARKERS.search(e.normalized), e.normalized
    assert not MARKERS.search(line), line


@pytest.mark.parametrize("sql", UNPARSEABLE)
def test_unparseable_text_is_never_echoed(sql: str) -> None:
    e = event_for(sql, **SESSION, command="other", verdict="rejected", rule="syntax")
    assert e.normalized == "<unparseable>"
    assert e.fingerprint == ""
    assert not MARKERS.search(format_event(e))


def test_long_statements_are_cut_after_normalizing() -> None:
    values = ", ".join(f"('acme', 'Secret{i}')" for i in range(3000))
    sql = f"INSERT INTO orders (tenant_id, note) VALUES {values}"
    e = event_for(sql, **SESSION, command="insert", verdict="rejected", rule="r")
    assert len(e.normalized) <= MAX_NORMALIZED_CHARS + 3
    assert e.normalized.endswith("...")
    assert not MARKERS.search(e.normalized)


SECRET = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=30
).map(lambda s: "Secret" + s)
NUMBER = st.integers(min_value=4242_000, max_value=4242_999_999_999)


def quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def escape_string(s: str) -> str:
    return "E'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def dollar(s: str) -> str:
    tag = "q"
    while f"${tag}$" in s:
        tag += "q"
    return f"${tag}${s}${tag}$"


TEMPLATES = [
    "SELECT * FROM orders WHERE note = {s} AND id = {n}",
    "SELECT {s2} AS a, {n} + 1",
    "UPDATE orders SET note = {s} WHERE id IN ({n}, {n}, {n})",
    "INSERT INTO orders (note, qty) VALUES ({s}, {n}.5)",
    "SELECT 1 -- {raw}\n",
    "SELECT /* {rawc} */ 2",
    "SELECT * FROM orders WHERE note = {d}",
]


@settings(max_examples=200, deadline=None)
@given(
    secret=SECRET,
    number=NUMBER,
    template=st.sampled_from(TEMPLATES),
)
def test_hypothesis_normalized_text_has_no_literal(secret: str, number: int, template: str) -> None:
    raw = secret.replace("\n", " ").replace("\r", " ")
    sql = template.format(
        s=quote(secret),
        s2=escape_string(secret),
        n=number,
        raw=raw,
        rawc=raw.replace("*/", "").replace("/*", ""),
        d=dollar(secret),
    )
    e = event_for(sql, **SESSION, command="select", verdict="rejected", rule="r")
    line = format_event(e)
    assert "Secret" not in e.normalized
    assert str(number) not in e.normalized
    assert "Secret" not in line
    assert str(number) not in line


# --- the log -----------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


async def test_writes_json_lines_to_a_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), queue_size=100, statements=True, on_drop=None)
    task = asyncio.create_task(log.run())
    log.record(event("rejected"))
    log.record(event("allowed", duration_ms=0.5, rows=1))
    log.record(event("error"))
    await log.close()
    await task
    lines = read_lines(path)
    assert [line["verdict"] for line in lines] == ["rejected", "allowed", "error"]
    assert all(list(line) == KEYS for line in lines)
    assert path.read_text().endswith("\n")


async def test_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text('{"earlier": true}\n')
    log = AuditLog(str(path), queue_size=10, statements=False, on_drop=None)
    log.record(event())
    await log.close()  # close() alone writes what is queued
    assert len(path.read_text().splitlines()) == 2


async def test_rejections_always_statements_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), queue_size=100, statements=False, on_drop=None)
    assert log.wants_statements is False
    task = asyncio.create_task(log.run())
    for verdict in ("allowed", "rejected", "would_reject", "error"):
        log.record(event(verdict))
    log.statements = True  # a reload may turn it on
    assert log.wants_statements
    log.record(event("allowed"))
    await log.close()
    await task
    assert [line["verdict"] for line in read_lines(path)] == [
        "rejected",
        "would_reject",
        "allowed",
    ]


async def test_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog("stdout", queue_size=10, statements=True, on_drop=None)
    task = asyncio.create_task(log.run())
    log.record(event())
    await log.close()
    await task
    out = capsys.readouterr().out
    assert [json.loads(line)["verdict"] for line in out.splitlines()] == ["rejected"]


async def test_overflow_drops_and_counts_without_blocking(tmp_path: Path) -> None:
    drops: list[int] = []
    log = AuditLog(str(tmp_path / "a.log"), queue_size=3, statements=True, on_drop=drops.append)
    start = time.perf_counter()
    for _ in range(5):
        log.record(event())
    assert time.perf_counter() - start < 0.5
    assert log.pending == 3
    assert log.dropped == 2
    assert drops == [1, 1]
    await log.close()
    assert len(read_lines(tmp_path / "a.log")) == 3
    log.record(event())  # after close: dropped, never raises
    assert log.dropped == 3


async def test_record_never_waits_for_a_slow_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "slow.log"
    log = AuditLog(str(path), queue_size=50, statements=True, on_drop=None)
    original = log._write_batch

    def slow(batch: list[AuditEvent]) -> int:
        time.sleep(0.2)
        return original(batch)

    monkeypatch.setattr(log, "_write_batch", slow)
    task = asyncio.create_task(log.run())
    await asyncio.sleep(0)
    log.record(event())
    await asyncio.sleep(0.01)  # the writer is now busy in its thread
    # The event loop stays responsive while the writer sleeps.
    ticks = 0
    start = time.perf_counter()
    while time.perf_counter() - start < 0.1:
        await asyncio.sleep(0.005)
        ticks += 1
    assert ticks > 5
    start = time.perf_counter()
    for _ in range(1000):
        log.record(event())
    assert time.perf_counter() - start < 0.5
    assert log.dropped == 1000 - 50
    await log.close()
    await task
    assert len(read_lines(path)) == 51


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
async def test_write_errors_count_as_drops(caplog: pytest.LogCaptureFixture) -> None:
    drops: list[int] = []
    log = AuditLog("/dev/full", queue_size=10, statements=True, on_drop=drops.append)
    task = asyncio.create_task(log.run())
    log.record(event())
    log.record(event())
    await log.close()
    await task
    assert sum(drops) == 2
    assert "audit log write to /dev/full failed" in caplog.text


def test_unwritable_output_fails_fast(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"audit\.output"):
        AuditLog(str(tmp_path / "missing" / "audit.log"), 10, True, None)


async def test_reopen_after_rotation(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(str(path), queue_size=10, statements=True, on_drop=None)
    task = asyncio.create_task(log.run())
    log.record(event(session_id="before"))
    for _ in range(100):
        if path.stat().st_size:
            break
        await asyncio.sleep(0.01)
    path.rename(tmp_path / "audit.log.1")
    log.reopen()
    log.record(event(session_id="after"))
    await log.close()
    await task
    assert [line["session_id"] for line in read_lines(tmp_path / "audit.log.1")] == ["before"]
    assert [line["session_id"] for line in read_lines(path)] == ["after"]


async def test_close_is_idempotent_and_run_is_single(tmp_path: Path) -> None:
    log = AuditLog(str(tmp_path / "a.log"), queue_size=10, statements=True, on_drop=None)
    task = asyncio.create_task(log.run())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="already running"):
        await log.run()
    await log.close()
    await log.close()
    await task


async def test_cancelled_writer_then_close_still_flushes(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    log = AuditLog(str(path), queue_size=10, statements=True, on_drop=None)
    task = asyncio.create_task(log.run())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    log.record(event())
    await log.close()
    assert len(read_lines(path)) == 1
