"""CPU each proxy spends per transaction: a load-insensitive view of proxy cost.

    .venv/bin/python benchmarks/cpu_cost.py [--cases W1-enforce,W4-enforce]
        [--protocols simple,prepared] [--clients 8] [--seconds 5] [--rounds 2]
        [--targets pgbouncer,forwarder,tenantgate,tenantgate-pure] [--counters]
        [--json out.json] [--markdown out.md]

TPS ratios on a 2-core box depend on everything else that runs; the CPU time a
proxy process burns for each transaction it carries does not, much.  This runs
pgbench (the workloads of ``run.py``) through PgBouncer, a bare uvloop byte
forwarder (``forwarder.py``: the floor for any Python proxy) and tenantgate
(``tenantgate-pure``: the same with its compiled modules ignored), reads each
proxy's user and system CPU from ``/proc/<pid>/stat`` around the run, and
prints microseconds of proxy CPU per transaction, and where the rest of the
machine's busy CPU per transaction (``/proc/stat``) went: PostgreSQL (its
postmaster, its live backends and the backends it has reaped) and pgbench.
Rounds are interleaved.

``--counters`` also reads the proxy's user-mode hardware counters with
``perf stat`` (instructions, cycles, cache misses per transaction): how much
work the proxy does per transaction, and how well the CPU runs it.  Counting
per task costs the proxy's system time, so take TPS and CPU from a run
without it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from services import (
    BENCH_TENANT,
    DATABASE,
    HOST,
    Database,
    Forwarder,
    PgBouncer,
    Scale,
    Tenantgate,
    process_cpu,
    run_command,
    stat_fields,
)
from workloads import CASES, HOT_KEYS, Case

import tenantgate

_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_DONE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)


@dataclass
class Cost:
    case: str
    protocol: str
    target: str
    round: int
    tps: float
    transactions: int
    proxy_user_us: float
    proxy_system_us: float
    machine_busy_us: float
    postgres_us: float = 0.0
    pgbench_us: float = 0.0
    # perf stat of the proxy, user mode, per transaction (--counters)
    user_instructions: float | None = None
    user_cycles: float | None = None
    user_cache_misses: float | None = None

    @property
    def proxy_us(self) -> float:
        return self.proxy_user_us + self.proxy_system_us


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine (all but idle and iowait)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


ClusterRead = tuple[int, frozenset[int]]


def _cluster_ticks(postmaster: int) -> ClusterRead:
    """One pass over /proc: the clock ticks of a postmaster, its live children and
    the children it has reaped, and the pids of the live children."""
    ticks = 0
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = stat_fields(entry.name)
        except OSError:  # exited meanwhile
            continue
        if int(entry.name) == postmaster:
            ticks += sum(int(v) for v in fields[11:15])
        elif int(fields[1]) == postmaster:
            ticks += int(fields[11]) + int(fields[12])
            children.add(int(entry.name))
    return ticks, frozenset(children)


def settled_ticks(read: Callable[[], ClusterRead], attempts: int = 40) -> int:
    """The ticks of a read during which no child exited.

    A backend that exits in the middle of a pass, after the postmaster was read
    and before its own entry, is counted nowhere: its whole run's time goes
    missing (the backends of a proxy's connections exit just as a run ends).  A
    pass whose children are those of the pass before it lost none of them.
    """
    ticks, children = read()
    for _ in range(attempts):
        time.sleep(0.05)
        again, now = read()
        if now == children:
            return again
        ticks, children = again, now
    return ticks


def postgres_cpu(data_dir: Path) -> float:
    """CPU seconds of a cluster: its postmaster, its live children, and the
    children it has reaped (a backend's time is lost from /proc when it exits)."""
    postmaster = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    return settled_ticks(lambda: _cluster_ticks(postmaster)) / os.sysconf("SC_CLK_TCK")


def reaped_children_cpu() -> float:
    """CPU seconds of this process's children that have exited (pgbench runs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


_COUNTERS = ("instructions:u", "cycles:u", "cache-misses:u")


class Counters:
    """``perf stat`` of one process's user-mode counters while a run lasts."""

    def __init__(self, pid: int, output: Path) -> None:
        self.output = output
        self.proc = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-o", str(output), "-e", ",".join(_COUNTERS),
             "-p", str(pid)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.3)  # attached before the run starts

    def stop(self) -> dict[str, float]:
        """Counter totals by event name (an event perf could not count is absent)."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(timeout=30)
        totals: dict[str, float] = {}
        for line in self.output.read_text().splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[2] in _COUNTERS:
                with contextlib.suppress(ValueError):  # "<not counted>"
                    totals[fields[2]] = float(fields[0])
        return totals


def pgbench(
    port: int, user: str, password: str, protocol: str, clients: int, seconds: int, script: Path,
    scale: Scale,
) -> str:  # fmt: skip
    tenant = f"'{BENCH_TENANT}'" if protocol == "simple" else BENCH_TENANT
    env = {**os.environ, "PGPASSWORD": password, "PGSSLMODE": "disable"}
    done = subprocess.run(
        ["pgbench", "-n", "-h", HOST, "-p", str(port), "-U", user, "-c", str(clients), "-j", "2",
         "-T", str(seconds), "-M", protocol, "-f", str(script), "-D", f"tenant={tenant}",
         "-D", f"hot={HOT_KEYS}", "-D", f"naccounts={scale.accounts}",
         "-D", f"nbranches={scale.branches}", "-D", f"ntellers={scale.tellers}", DATABASE],
        env=env, capture_output=True, text=True, timeout=seconds + 120, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"pgbench failed: {done.stderr[-500:]}")
    return done.stdout


def measure(
    case: Case, protocol: str, target: str, pid: int, port: int, user: str, password: str,
    args: argparse.Namespace, script: Path, scale: Scale, round_no: int, data_dir: Path,
) -> Cost:  # fmt: skip
    counters = Counters(pid, data_dir.parent / "perf-stat.csv") if args.counters else None
    user0, sys0 = process_cpu(pid)
    busy0, postgres0, pgbench0 = machine_busy(), postgres_cpu(data_dir), reaped_children_cpu()
    out = pgbench(port, user, password, protocol, args.clients, args.seconds, script, scale)
    user1, sys1 = process_cpu(pid)
    busy1, postgres1, pgbench1 = machine_busy(), postgres_cpu(data_dir), reaped_children_cpu()
    totals = counters.stop() if counters is not None else {}
    done = _DONE.search(out)
    tps = _TPS.search(out)
    transactions = int(done.group(1)) if done else 0
    per = 1e6 / max(transactions, 1)

    def counted(event: str) -> float | None:
        return totals[event] / max(transactions, 1) if event in totals else None

    return Cost(
        case.key, protocol, target, round_no, float(tps.group(1)) if tps else 0.0, transactions,
        (user1 - user0) * per, (sys1 - sys0) * per, (busy1 - busy0) * per,
        (postgres1 - postgres0) * per, (pgbench1 - pgbench0) * per,
        counted("instructions:u"), counted("cycles:u"), counted("cache-misses:u"),
    )  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description="proxy CPU per transaction")
    parser.add_argument("--cases", default="W1-enforce,W4-enforce")
    parser.add_argument("--protocols", default="simple,prepared")
    parser.add_argument("--targets", default="pgbouncer,forwarder,tenantgate")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--accounts", type=int, default=20_000)
    parser.add_argument(
        "--counters", action="store_true", help="also read the proxy's user-mode perf counters"
    )
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None, help="write the median table")
    args = parser.parse_args()
    print(f"tenantgate: {tenantgate.COMPILED_WHY} (tenantgate-pure: source)", flush=True)
    cases = [c for c in CASES if c.key in args.cases.split(",")]
    targets = args.targets.split(",")
    scale = Scale(accounts=args.accounts)
    results: list[Cost] = []
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="tenantgate-cpu-"))
        workdir.chmod(0o711)  # PgBouncer runs as postgres and reads its own subdirectory
        stack.callback(shutil.rmtree, workdir, True)
        db = Database(scale, max_connections=200)
        stack.callback(db.stop)
        db.start()
        bouncer = PgBouncer(workdir, db, max_clients=100) if "pgbouncer" in targets else None
        if bouncer is not None:
            stack.callback(bouncer.stop)
            bouncer.start()
        forwarder = Forwarder(workdir, db) if "forwarder" in targets else None
        if forwarder is not None:
            stack.callback(forwarder.stop)
            forwarder.start()
        proxies: dict[tuple[str, str], Tenantgate] = {}
        for case in cases:
            for target in targets:
                if target.startswith("tenantgate") and (case.mode, target) not in proxies:
                    proxy = Tenantgate(workdir, db, case.mode, pure=target == "tenantgate-pure")
                    proxies[case.mode, target] = proxy
                    stack.callback(proxy.stop)
                    proxy.start()
        for round_no in range(1, args.rounds + 1):
            for case in cases:
                base = workdir / f"{case.key}.base.sql"
                base.write_text(case.baseline_script)
                mine = workdir / f"{case.key}.proxy.sql"
                mine.write_text(case.proxy_script)
                for protocol in [p for p in args.protocols.split(",") if p in case.protocols]:
                    role = case.baseline_role
                    for target in targets:
                        if target == "pgbouncer":
                            assert bouncer is not None
                            assert bouncer.proc is not None
                            run = (bouncer.proc.pid, bouncer.port, role, db.password_of(role), base)
                        elif target == "forwarder":
                            assert forwarder is not None
                            run = (forwarder.pid, forwarder.port, role, db.password_of(role), base)
                        else:
                            tg = proxies[case.mode, target]
                            user = tg.user_of(BENCH_TENANT)
                            run = (tg.pid, tg.port, user, tg.passwords[BENCH_TENANT], mine)
                        pid, port, user, password, script = run
                        cost = measure(
                            case, protocol, target, pid, port, user, password, args, script,
                            scale, round_no, db.cluster.data_dir,
                        )  # fmt: skip
                        results.append(cost)
                        print(
                            f"r{round_no} {case.key:11} {protocol:9} {target:11} "
                            f"{cost.tps:8.0f} tps  proxy {cost.proxy_us:6.1f} us/tx "
                            f"(user {cost.proxy_user_us:5.1f} sys {cost.proxy_system_us:5.1f})  "
                            f"machine {cost.machine_busy_us:6.1f} us/tx (postgres "
                            f"{cost.postgres_us:5.1f} pgbench {cost.pgbench_us:5.1f})",
                            flush=True,
                        )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    table = median_table(results)
    print(table)
    if args.markdown is not None:
        args.markdown.write_text(table)
    return 0


def median_table(results: list[Cost]) -> str:
    """Medians over the rounds, one row per case, protocol and target."""
    groups: dict[tuple[str, str, str], list[Cost]] = {}
    for cost in results:
        groups.setdefault((cost.case, cost.protocol, cost.target), []).append(cost)
    counted = any(c.user_cycles is not None for c in results)
    head = (
        "| case | proto | target | TPS | proxy CPU us/tx (user + sys) | machine busy us/tx "
        "| of which PostgreSQL | of which pgbench |"
    )
    rule = "|---|---|---|---|---|---|---|---|"
    if counted:
        head += " user instructions/tx | user cycles/tx | IPC | user cache misses/tx |"
        rule += "---|---|---|---|"
    lines = [head, rule]
    for (case, protocol, target), costs in groups.items():
        user = statistics.median(c.proxy_user_us for c in costs)
        system = statistics.median(c.proxy_system_us for c in costs)
        tps = statistics.median(c.tps for c in costs)
        busy = statistics.median(c.machine_busy_us for c in costs)
        postgres = statistics.median(c.postgres_us for c in costs)
        pgbench = statistics.median(c.pgbench_us for c in costs)
        line = (
            f"| {case} | {protocol} | {target} | {tps:,.0f} | {user + system:.0f} "
            f"({user:.0f} + {system:.0f}) | {busy:.0f} | {postgres:.0f} | {pgbench:.0f} |"
        )
        if counted:
            line += " " + _counter_cells(costs)
        lines.append(line)
    return "\n".join(lines) + "\n"


def _counter_cells(costs: list[Cost]) -> str:
    instructions = [c.user_instructions for c in costs if c.user_instructions is not None]
    cycles = [c.user_cycles for c in costs if c.user_cycles is not None]
    misses = [c.user_cache_misses for c in costs if c.user_cache_misses is not None]
    if not (instructions and cycles and misses):
        return "n/a | n/a | n/a | n/a |"
    i, c = statistics.median(instructions), statistics.median(cycles)
    return f"{i:,.0f} | {c:,.0f} | {i / c:.2f} | {statistics.median(misses):,.0f} |"


if __name__ == "__main__":
    run_command(main)
