"""Where tenantgate spends its time under W1: py-spy on the proxy process.

    .venv/bin/python benchmarks/profile_w1.py [--protocols simple,prepared] [--seconds 10]
        [--clients 8] [--mode enforce] [--case W3-both] [--out benchmarks/results]

Starts the same services as run.py (no PgBouncer), runs W1 through tenantgate
with pgbench and samples the tenantgate process with ``py-spy record`` (raw
collapsed stacks, non-blocking, 200 Hz), then prints and writes the functions
with the most self and inclusive samples (``profile-<protocol>.txt``) and a
flame graph of the first protocol (``profile.svg``).  py-spy must be installed
in the venv (``pip install py-spy``; it is in the ``dev`` extra).  ``--case``
profiles another workload of ``workloads.CASES`` instead of W1.  tenantgate
runs as pure Python here (``TENANTGATE_PURE_PYTHON=1``): py-spy cannot see
inside the compiled modules.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from services import (
    BENCH_TENANT,
    DATABASE,
    HOST,
    VENV_BIN,
    Database,
    Scale,
    Tenantgate,
    process_cpu,
    run_command,
    stop_process,
)
from workloads import CASES, HOT_KEYS

RATE = 200
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match.group("file")
    for marker in ("site-packages/", "proxy/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{match.group('func')} ({path})"


def summarize_raw(raw: Path, top: int = 25) -> tuple[str, int]:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";") if f.strip()]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    lines = [f"samples: {total}", "", "self time (top functions):"]
    for name, count in own.most_common(top):
        lines.append(f"  {100 * count / max(total, 1):5.1f}%  {name}")
    lines += ["", "inclusive time:"]
    for name, count in inclusive.most_common(top + 10):
        lines.append(f"  {100 * count / max(total, 1):5.1f}%  {name}")
    return "\n".join(lines) + "\n", total


def pgbench(
    proxy: Tenantgate, protocol: str, clients: int, seconds: int, script: Path, scale: Scale
) -> subprocess.Popen[str]:
    tenant = f"'{BENCH_TENANT}'" if protocol == "simple" else BENCH_TENANT
    env = {**os.environ, "PGPASSWORD": proxy.passwords[BENCH_TENANT], "PGSSLMODE": "disable"}
    return subprocess.Popen(
        [
            "pgbench", "-n", "-h", HOST, "-p", str(proxy.port), "-U", proxy.user_of(BENCH_TENANT),
            "-c", str(clients), "-j", "2", "-T", str(seconds), "-M", protocol, "-f", str(script),
            "-D", f"tenant={tenant}", "-D", f"hot={HOT_KEYS}",
            "-D", f"naccounts={scale.accounts}", "-D", f"nbranches={scale.branches}",
            "-D", f"ntellers={scale.tellers}", DATABASE,
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # fmt: skip


def start_services(
    stack: contextlib.ExitStack, mode: str, *, pure: bool, prefix: str
) -> tuple[Path, Tenantgate, Scale]:
    """PostgreSQL with the bench schema and one tenantgate in ``mode``, stopped (and
    their work directory removed) when ``stack`` unwinds: (workdir, proxy, scale)."""
    scale = Scale(accounts=20_000)
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, workdir, True)
    db = Database(scale, max_connections=300)
    stack.callback(db.stop)
    db.start()
    proxy = Tenantgate(workdir, db, mode, pure=pure)
    stack.callback(proxy.stop)
    proxy.start()
    return workdir, proxy, scale


def main() -> int:
    parser = argparse.ArgumentParser(description="py-spy profile of tenantgate under W1")
    parser.add_argument("--protocols", default="simple,prepared")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mode", default="enforce", choices=["enforce", "both"])
    parser.add_argument("--case", default=None, help="a workloads.CASES key (default W1-<mode>)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    pyspy = shutil.which("py-spy") or str(VENV_BIN / "py-spy")
    if not os.access(pyspy, os.X_OK):
        print("py-spy is not installed: .venv/bin/pip install py-spy", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    case = next(c for c in CASES if c.key == (args.case or f"W1-{args.mode}"))
    with contextlib.ExitStack() as stack:
        workdir, proxy, scale = start_services(
            stack, case.mode, pure=True, prefix="tenantgate-profile-"
        )
        script = workdir / "w1.sql"
        script.write_text(case.proxy_script)
        for index, protocol in enumerate(args.protocols.split(",")):
            bench = pgbench(proxy, protocol, args.clients, args.seconds + 4, script, scale)
            stack.callback(stop_process, bench)  # type: ignore[arg-type]
            time.sleep(2)  # connected and warm
            raw = workdir / f"{protocol}.raw"
            cpu_before, wall_before = process_cpu(proxy.pid), time.monotonic()
            subprocess.run(
                [pyspy, "record", "--pid", str(proxy.pid), "--duration", str(args.seconds),
                 "--rate", str(RATE), "--nonblocking", "--format", "raw", "-o", str(raw)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            cpu_after, wall = process_cpu(proxy.pid), time.monotonic() - wall_before
            user = cpu_after[0] - cpu_before[0]
            system = cpu_after[1] - cpu_before[1]
            output, _ = bench.communicate(timeout=args.seconds + 60)
            tps = re.search(r"^tps = ([0-9.]+)", output, re.M)
            summary, total = summarize_raw(raw)
            header = (
                f"{case.key} {protocol}, {args.clients} clients, py-spy {RATE} Hz for "
                f"{args.seconds} s (non-blocking; idle excluded): {total} samples = "
                f"{100 * total / (RATE * args.seconds):.0f}% of one core busy in Python; "
                f"pgbench {tps.group(1) if tps else '?'} tps under profiling; tenantgate CPU "
                f"in that window: user {user:.1f} s + system {system:.1f} s over {wall:.1f} s "
                f"wall ({100 * (user + system) / wall:.0f}% of a core, "
                f"{100 * system / max(user + system, 1e-9):.0f}% of it in the kernel); "
                f"load average {os.getloadavg()[0]:.1f}\n"
            )
            text = header + summary
            (args.out / f"profile-{protocol}.txt").write_text(text)
            shutil.copyfile(raw, args.out / f"profile-{protocol}.raw")
            print(text)
            if index == 0:
                bench = pgbench(proxy, protocol, args.clients, args.seconds + 4, script, scale)
                stack.callback(stop_process, bench)  # type: ignore[arg-type]
                time.sleep(2)
                subprocess.run(
                    [pyspy, "record", "--pid", str(proxy.pid), "--duration", str(args.seconds),
                     "--rate", str(RATE), "--nonblocking", "-o", str(args.out / "profile.svg")],
                    check=True, capture_output=True, text=True,
                )  # fmt: skip
                bench.communicate(timeout=args.seconds + 60)
    return 0


if __name__ == "__main__":
    run_command(main)
