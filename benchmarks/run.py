"""tenantgate vs PgBouncer vs direct PostgreSQL: one command, one machine.

    .venv/bin/python benchmarks/run.py [--quick] [--rounds N] [--duration S]
        [--clients 8,64] [--workloads W1,W2,W3,W4] [--protocols simple,extended,prepared]
        [--out benchmarks/results] [--max-clients 5000] [--idle-clients 1000]

Starts a throwaway PostgreSQL cluster, PgBouncer (session pooling) and one
``tenantgate serve`` subprocess per mode, loads a multi-tenant pgbench schema
with fail-closed RLS, runs pgbench against direct / PgBouncer / tenantgate in
interleaved rounds (at 8 clients also the bare Python forwarder, the floor of
any Python proxy here; ``--no-forwarder`` leaves it out), measures
tenantgate's RSS with idle clients and the largest client count it holds, and
writes results.md, results.json and results.png.  See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psycopg
from connections import measure_connections
from report import TARGET_CLIENTS, summarize, target_lines, write_outputs
from services import (
    APP_ROLE,
    BENCH_TENANT,
    DATABASE,
    HOST,
    Database,
    Forwarder,
    PgBouncer,
    Scale,
    Tenantgate,
    cpu_model,
    raise_nofile,
    run_command,
    tool_version,
)
from workloads import (
    CASES,
    FLOOR,
    PROTOCOLS,
    TARGETS,
    TARGETS_WITH_FLOOR,
    Case,
    Endpoint,
    Measurement,
    run_pgbench,
    write_scripts,
)

import tenantgate


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a < 2 minute subset")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (5)")
    parser.add_argument("--duration", type=int, default=None, help="seconds per run (3)")
    parser.add_argument("--clients", default=None, help="client counts, e.g. 8,64")
    parser.add_argument("--workloads", default=None, help="W1,W2,W3,W4")
    parser.add_argument("--protocols", default=None, help="simple,extended,prepared")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--idle-clients", type=int, default=1000)
    parser.add_argument("--max-clients", type=int, default=None, help="try this many (5000)")
    parser.add_argument("--accounts", type=int, default=100_000, help="accounts per tenant")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--no-forwarder",
        action="store_true",
        help="leave out the reference forwarder (run at 8 clients otherwise)",
    )
    parser.add_argument(
        "--connections-only", action="store_true", help="only the idle-RSS / max-clients test"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 5)
    args.duration = args.duration or (2 if quick else 3)
    args.clients = [int(c) for c in (args.clients or ("8" if quick else "8,64")).split(",")]
    workloads = (args.workloads or "W1,W2,W3,W4").upper().split(",")
    protocols = (args.protocols or ("simple,prepared" if quick else ",".join(PROTOCOLS))).split(",")
    bad = set(protocols) - set(PROTOCOLS)
    if bad:
        parser.error(f"unknown protocols {sorted(bad)}")
    args.protocol_list = protocols
    args.cases = [] if args.connections_only else [c for c in CASES if c.workload in workloads]
    if not args.cases and not args.connections_only:
        parser.error("no workload selected (W1, W2, W3, W4)")
    args.max_clients = args.max_clients or (args.idle_clients if quick else 5000)
    args.accounts = 20_000 if quick and args.accounts == 100_000 else args.accounts
    return args


def targets_for(clients: int, with_forwarder: bool) -> tuple[str, ...]:
    """The targets of one interleaved group, in run order: the forwarder (before
    tenantgate) only at the client count the issue's targets are stated for."""
    return TARGETS_WITH_FLOOR if with_forwarder and clients == TARGET_CLIENTS else TARGETS


def check_visibility(endpoints: dict[str, Endpoint], case: Case) -> None:
    """Each target returns the tenant's row: RLS and the proxy are set up as intended."""
    for target, ep in endpoints.items():
        conninfo = (
            f"host={HOST} port={ep.port} dbname={DATABASE} user={ep.user} "
            f"password={ep.password} sslmode=disable"
        )
        with psycopg.connect(conninfo, autocommit=True) as conn:
            predicate = "" if case.workload == "W2" else "tenant_id = %s AND "
            params: tuple[Any, ...] = () if case.workload == "W2" else (BENCH_TENANT,)
            sql = f"SELECT abalance FROM pgbench_accounts WHERE {predicate}aid = 1"
            if target == "tenantgate" or case.mode == "enforce":
                rows = conn.execute(sql, params).fetchall()
            else:
                with conn.transaction():
                    conn.execute("SELECT set_config('app.tenant_id', %s, true)", (BENCH_TENANT,))
                    rows = conn.execute(sql, params).fetchall()
            if len(rows) != 1:
                raise RuntimeError(f"{case.key} via {target}: expected 1 row, got {len(rows)}")


def machine_info(db: Database, bouncer: PgBouncer) -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "postgres": db.version,
        "pgbouncer": bouncer.version,
        "python": platform.python_version(),
        "pgbench": tool_version(["pgbench", "--version"]),
        "kernel": platform.release(),
        "tenantgate_build": tenantgate.COMPILED_WHY,  # compiled hot path, or why not
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    raise_nofile()  # inherited by tenantgate / PgBouncer: 5,000 clients need ~10,000 fds
    command = ".venv/bin/python benchmarks/run.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    started_at = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    t0 = time.monotonic()
    with_forwarder = not args.no_forwarder
    n_runs = (
        args.rounds
        * sum(len(targets_for(clients, with_forwarder)) for clients in args.clients)
        * sum(len([p for p in c.protocols if p in args.protocol_list]) for c in args.cases)
    )
    print(
        f"{n_runs} pgbench runs of {args.duration}s (~{n_runs * (args.duration + 0.7) / 60:.1f} "
        f"min) plus setup and the connection test",
        flush=True,
    )
    scale = Scale(accounts=args.accounts)
    runs: list[Measurement] = []
    incidents: list[str] = []
    result: dict[str, Any] = {}
    load_start = list(os.getloadavg())
    with contextlib.ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="tenantgate-bench-"))
        workdir.chmod(0o711)  # PgBouncer runs as postgres and reads its own subdirectory
        if args.keep:
            print(f"work directory (kept): {workdir}")
        else:
            stack.callback(shutil.rmtree, workdir, True)
        db = Database(scale, max_connections=max(300, args.max_clients + 300))
        if args.connections_only:
            db.scale = Scale(accounts=1000)
        stack.callback(db.stop)
        print("starting PostgreSQL and loading the schema ...", flush=True)
        db.start()
        bouncer = PgBouncer(workdir, db, max_clients=max(args.clients) + 50)
        stack.callback(bouncer.stop)
        bouncer.start()
        forwarder = Forwarder(workdir, db)
        if with_forwarder:
            stack.callback(forwarder.stop)
            forwarder.start()
        proxies: dict[str, Tenantgate] = {}
        for mode in sorted({c.mode for c in args.cases}):
            proxy = Tenantgate(workdir, db, mode)
            stack.callback(proxy.stop)
            proxy.start()
            proxies[mode] = proxy
        print(
            f"PostgreSQL {db.port}, PgBouncer {bouncer.port}, "
            + (f"forwarder {forwarder.port}, " if with_forwarder else "")
            + ", ".join(f"tenantgate {m} {p.port}" for m, p in proxies.items()),
            flush=True,
        )
        scripts = write_scripts(workdir)
        logdir = workdir / "pgbench"
        logdir.mkdir()

        def endpoints(case: Case) -> dict[str, Endpoint]:
            role = case.baseline_role
            proxy = proxies[case.mode]
            user = proxy.user_of(BENCH_TENANT)
            found = {
                "direct": Endpoint("direct", db.port, role, db.password_of(role)),
                "pgbouncer": Endpoint("pgbouncer", bouncer.port, role, db.password_of(role)),
                "tenantgate": Endpoint(
                    "tenantgate", proxy.port, user, proxy.passwords[BENCH_TENANT]
                ),
            }
            if with_forwarder:
                found[FLOOR] = Endpoint(FLOOR, forwarder.port, role, db.password_of(role))
            return found

        for case in args.cases:
            check_visibility(endpoints(case), case)
        print("visibility checks passed; benchmarking", flush=True)

        def build_result(connections: dict[str, Any] | None) -> dict[str, Any]:
            summary = summarize(runs)
            return {
                "command": command,
                "started": started_at,
                "elapsed_s": time.monotonic() - t0,
                "machine": machine_info(db, bouncer),
                "config": {
                    "rounds": args.rounds,
                    "duration": args.duration,
                    "clients": args.clients,
                    "protocols": args.protocol_list,
                    "cases": [c.key for c in args.cases],
                    "tenant": BENCH_TENANT,
                    "accounts_per_tenant": scale.accounts,
                    "branches_per_tenant": scale.branches,
                    "tellers_per_tenant": scale.tellers,
                    "rls_role": APP_ROLE,
                    "forwarder": with_forwarder,
                },
                "load_average": {"start": load_start, "end": list(os.getloadavg())},
                "summary": summary,
                "connections": connections,
                "targets": target_lines(summary, connections),
                "incidents": incidents,
            }

        for round_no in range(1, args.rounds + 1):
            for clients in args.clients:
                for case in args.cases:
                    for protocol in (p for p in case.protocols if p in args.protocol_list):
                        for target in targets_for(clients, with_forwarder):  # A B C, A B C
                            script = scripts[
                                f"{case.key}.{'proxy' if target == 'tenantgate' else 'baseline'}"
                            ]
                            m = run_pgbench(
                                case=case,
                                script=script,
                                endpoint=endpoints(case)[target],  # (after restarts too)
                                protocol=protocol,
                                clients=clients,
                                duration=args.duration,
                                scale=scale,
                                logdir=logdir,
                                round_no=round_no,
                            )
                            runs.append(m)
                            status = "ok" if m.ok else f"FAILED {m.error}"
                            print(
                                f"r{round_no} c{clients:<3} {case.key:<11} {protocol:<8} "
                                f"{target:<10} {m.tps:9.0f} tps  p50 {m.p50_ms:6.3f}  "
                                f"p99 {m.p99_ms:6.3f} ms  {status}",
                                flush=True,
                            )
                            if target == FLOOR and not forwarder.alive():
                                incidents.append(f"the forwarder died in r{round_no}: restarted")
                                forwarder.start()
                            proxy = proxies[case.mode]
                            if target == "tenantgate" and not proxy.alive():
                                msg = (
                                    f"tenantgate {case.mode} died during {case.key} {protocol} "
                                    f"c{clients} r{round_no}; log tail: " + proxy.log_text()[-1500:]
                                )
                                incidents.append(msg)
                                print(msg, flush=True)
                                proxy.start()
            write_outputs(build_result(None), runs, args.out)  # partial results per round
        for proxy in proxies.values():
            errors = [ln for ln in proxy.log_text().splitlines() if "ERROR" in ln or "Trace" in ln]
            if errors:
                incidents.append(
                    f"tenantgate {proxy.mode} logged {len(errors)} error lines, first: {errors[0]}"
                )
        print(
            f"connection test: {args.idle_clients} idle, then up to {args.max_clients} ...",
            flush=True,
        )
        conn_proxy = Tenantgate(workdir, db, "enforce", name="tenantgate-connections")
        stack.callback(conn_proxy.stop)
        conn_proxy.start()
        time.sleep(0.5)
        conn_dict: dict[str, Any] | None = None
        try:
            connections = measure_connections(conn_proxy, args.idle_clients, args.max_clients)
            conn_dict = connections.as_dict()
            print(conn_dict, flush=True)
        except Exception as exc:  # report, keep the pgbench results
            incidents.append(f"connection test failed: {type(exc).__name__}: {exc}")
        if not conn_proxy.alive():
            incidents.append(
                "tenantgate died during the connection test; log tail: "
                + conn_proxy.log_text()[-1500:]
            )
        conn_proxy.stop()
        result = build_result(conn_dict)
        write_outputs(result, runs, args.out)
    print((args.out / "results.md").read_text())
    for line in incidents:
        print("INCIDENT:", line)
    print(f"wrote {args.out}/results.md, results.json, results.png")
    return 0


if __name__ == "__main__":
    run_command(main)
