"""Workloads (pgbench scripts) and running one pgbench measurement.

A *case* is one workload in one tenantgate mode, with the script every target
runs.  Direct PostgreSQL and PgBouncer log in as the upstream role; for the
rls/both modes they run the app-side equivalent (a transaction that calls
``set_config('app.tenant_id', tenant, true)`` first), so the database does
the same isolation work on every target.  Through tenantgate, pgbench logs in
as the tenant user ``acme_app`` and the tenant is fixed by that login.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from services import APP_ROLE, BENCH_TENANT, DATABASE, ENFORCE_ROLE, HOST, Scale

SET_TENANT = "SELECT set_config('app.tenant_id', :tenant, true);"

W1_SELECT = """\\set aid random(1, :hot)
SELECT abalance FROM pgbench_accounts WHERE tenant_id = :tenant AND aid = :aid;
"""
W1_APP_RLS = f"""\\set aid random(1, :hot)
BEGIN;
{SET_TENANT}
SELECT abalance FROM pgbench_accounts WHERE tenant_id = :tenant AND aid = :aid;
COMMIT;
"""
W2_RLS = """\\set aid random(1, :hot)
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
"""
W2_APP_RLS = f"""\\set aid random(1, :hot)
BEGIN;
{SET_TENANT}
SELECT abalance FROM pgbench_accounts WHERE aid = :aid;
COMMIT;
"""
_TPCB_BODY = """UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE tenant_id = :tenant AND aid = :aid;
SELECT abalance FROM pgbench_accounts WHERE tenant_id = :tenant AND aid = :aid;
UPDATE pgbench_tellers SET tbalance = tbalance + :delta WHERE tenant_id = :tenant AND tid = :tid;
UPDATE pgbench_branches SET bbalance = bbalance + :delta WHERE tenant_id = :tenant AND bid = :bid;
INSERT INTO pgbench_history (tenant_id, tid, bid, aid, delta, mtime) VALUES (:tenant, :tid, :bid, :aid, :delta, CURRENT_TIMESTAMP);
COMMIT;
"""  # noqa: E501
_TPCB_SETS = """\\set aid random(1, :naccounts)
\\set bid random(1, :nbranches)
\\set tid random(1, :ntellers)
\\set delta random(-5000, 5000)
BEGIN;
"""
W3_TPCB = _TPCB_SETS + _TPCB_BODY
W3_APP_RLS = _TPCB_SETS + SET_TENANT + "\n" + _TPCB_BODY
# Simple protocol inlines every variable: the aid and a nonce make each text unique.
W4_UNIQUE = """\\set aid random(1, :naccounts)
\\set nonce random(1000000, 2000000000)
SELECT abalance FROM pgbench_accounts WHERE tenant_id = :tenant AND aid = :aid LIMIT :nonce;
"""
HOT_KEYS = 1000  # W1/W2 keys: few enough that simple-protocol texts repeat (cache hits)

TARGETS: tuple[str, ...] = ("direct", "pgbouncer", "tenantgate")
# The reference beside them at 8 clients: forwarder.py, a uvloop proxy that parses
# nothing, runs the baseline script (the floor of any Python proxy on this machine).
FLOOR = "forwarder"
# The run order (and the chart's) of a group that has it: just before tenantgate.
TARGETS_WITH_FLOOR: tuple[str, ...] = (*TARGETS[:-1], FLOOR, TARGETS[-1])
PROTOCOLS: tuple[str, ...] = ("simple", "extended", "prepared")


@dataclass(frozen=True)
class Case:
    key: str  # e.g. "W1-enforce"
    workload: str  # W1..W4
    mode: str  # tenantgate mode
    title: str
    baseline_script: str
    proxy_script: str
    protocols: tuple[str, ...] = PROTOCOLS
    target_ratio: float = 0.9

    @property
    def baseline_role(self) -> str:
        return ENFORCE_ROLE if self.mode == "enforce" else APP_ROLE


CASES: tuple[Case, ...] = (
    Case(
        "W1-enforce",
        "W1",
        "enforce",
        "select by key with tenant predicate (enforce)",
        W1_SELECT,
        W1_SELECT,
    ),
    Case(
        "W1-both",
        "W1",
        "both",
        "select by key with tenant predicate (both; baseline sets the tenant app-side)",
        W1_APP_RLS,
        W1_SELECT,
    ),
    Case(
        "W2-rls",
        "W2",
        "rls",
        "select by key relying on RLS (rls; baseline: BEGIN; set_config; SELECT; COMMIT)",
        W2_APP_RLS,
        W2_RLS,
        target_ratio=1.0,
    ),
    Case(
        "W3-both",
        "W3",
        "both",
        "TPC-B-like read/write with tenant predicates (both; baseline sets the tenant)",
        W3_APP_RLS,
        W3_TPCB,
    ),
    Case(
        "W4-enforce",
        "W4",
        "enforce",
        "simple protocol, every statement text unique (enforce)",
        W4_UNIQUE,
        W4_UNIQUE,
        protocols=("simple",),
        target_ratio=0.7,
    ),
)


@dataclass
class Endpoint:
    """Where a target listens and who logs in there."""

    target: str
    port: int
    user: str
    password: str


@dataclass
class Measurement:
    case: str
    protocol: str
    clients: int
    target: str
    round: int
    tps: float
    p50_ms: float
    p99_ms: float
    transactions: int
    failed: int
    ok: bool
    error: str = ""
    load1: float = 0.0  # 1-minute load average when the run ended (other work on the box)
    connect_ms: float = float("nan")  # pgbench's "initial connection time" (all clients)


_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_CONNECT = re.compile(r"^initial connection time = ([0-9.]+) ms", re.M)
# pgbench's -T clock includes connecting; many SCRAM logins on a loaded box take seconds.
EXTRA_SECONDS_PER_32_CLIENTS = 1
_FAILED = re.compile(r"^number of failed transactions: (\d+)", re.M)


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q * len(sorted_values) + 0.5)))
    return float(sorted_values[rank - 1])


def write_scripts(workdir: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for case in CASES:
        for kind, text in (("baseline", case.baseline_script), ("proxy", case.proxy_script)):
            path = workdir / f"{case.key}.{kind}.sql"
            path.write_text(text)
            paths[f"{case.key}.{kind}"] = path
    return paths


def run_pgbench(
    *,
    case: Case,
    script: Path,
    endpoint: Endpoint,
    protocol: str,
    clients: int,
    duration: int,
    scale: Scale,
    logdir: Path,
    round_no: int,
) -> Measurement:
    """One pgbench run; TPS from its summary, p50/p99 from its per-transaction log."""
    for old in logdir.glob("tx.*"):
        old.unlink()
    tenant = f"'{BENCH_TENANT}'" if protocol == "simple" else BENCH_TENANT
    args = [
        "pgbench",
        "-n",
        "-h",
        HOST,
        "-p",
        str(endpoint.port),
        "-U",
        endpoint.user,
        "-c",
        str(clients),
        "-j",
        str(min(2, clients)),
        "-T",
        str(duration + EXTRA_SECONDS_PER_32_CLIENTS * (clients // 32)),
        "-M",
        protocol,
        "-f",
        str(script),
        "-D",
        f"tenant={tenant}",
        "-D",
        f"hot={HOT_KEYS}",
        "-D",
        f"naccounts={scale.accounts}",
        "-D",
        f"nbranches={scale.branches}",
        "-D",
        f"ntellers={scale.tellers}",
        "--log",
        f"--log-prefix={logdir / 'tx'}",
        DATABASE,
    ]
    env = {
        **os.environ,
        "PGPASSWORD": endpoint.password,
        "PGSSLMODE": "disable",
        "PGCONNECT_TIMEOUT": "30",
    }
    base = Measurement(
        case.key, protocol, clients, endpoint.target, round_no, 0.0, float("nan"),
        float("nan"), 0, 0, False,
    )  # fmt: skip
    started = time.monotonic()
    try:
        done = subprocess.run(
            args,
            env=env,
            capture_output=True,
            text=True,
            timeout=duration + 120,
            check=False,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        base.error = f"pgbench timed out after {time.monotonic() - started:.0f}s"
        return base
    base.load1 = os.getloadavg()[0]
    latencies: list[int] = []
    failed = 0
    for path in logdir.glob("tx.*"):
        with path.open() as handle:
            for line in handle:
                fields = line.split()
                if len(fields) < 3:
                    continue
                if fields[2].isdigit():
                    latencies.append(int(fields[2]))
                else:
                    failed += 1
    latencies.sort()
    tps_match = _TPS.search(done.stdout)
    failed_match = _FAILED.search(done.stdout)
    connect_match = _CONNECT.search(done.stdout)
    if connect_match:
        base.connect_ms = float(connect_match.group(1))
    if failed_match:
        failed = max(failed, int(failed_match.group(1)))
    base.transactions = len(latencies)
    base.failed = failed
    base.p50_ms = percentile(latencies, 0.50) / 1000
    base.p99_ms = percentile(latencies, 0.99) / 1000
    base.tps = float(tps_match.group(1)) if tps_match else 0.0
    errors = [ln for ln in done.stderr.splitlines() if "error" in ln.lower() or "abort" in ln]
    base.ok = done.returncode == 0 and tps_match is not None and failed == 0 and bool(latencies)
    if not base.ok and not errors:
        errors = [
            f"tps line {'found' if tps_match else 'missing'}, {len(latencies)} logged "
            f"transactions, {failed} failed; stdout tail: "
            + " / ".join(done.stdout.splitlines()[-4:])
        ]
    if not base.ok:
        base.error = (
            f"pgbench exit {done.returncode}: "
            + " | ".join(errors[:3] or done.stderr.splitlines()[-3:])
        )[:500]
    return base


def median(values: list[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")
