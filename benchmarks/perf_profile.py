"""Where the compiled tenantgate spends its time: ``perf`` with DWARF call stacks.

    .venv/bin/python benchmarks/perf_profile.py [--case W4-enforce] [--protocol simple]
        [--seconds 5] [--clients 8] [--event cycles]
        [--out benchmarks/results/profile-perf-<case>-<protocol>.txt]

``profile_w1.py`` (py-spy) sees interpreted Python only, so it profiles the
pure-Python build; this profiles the build that runs, compiled modules and
all.  It starts PostgreSQL and one tenantgate (as ``run.py`` does), runs the
case's pgbench script through it, records the tenantgate process with ``perf
record --call-graph dwarf`` and reports, for every function of tenantgate's
own (compiled: ``CPyDef_<module>___<Class>___<method>``), the share of the
process's samples in it and below it (inclusive), and what it spends that on
(its direct callees, with the C-API call wrappers skipped, so an interpreted
callee shows as ``_PyEval_Vector``).  Needs ``perf`` (``apt-get install
linux-perf``) and permission to trace the process (root, or
``kernel.perf_event_paranoid`` <= 1).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "proxy"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from profile_w1 import pgbench, start_services
from services import process_cpu, run_command, stop_process
from workloads import CASES

import tenantgate

# Frames that only pass a call along: a callee is reported past them.
_CALL_WRAPPERS = re.compile(
    r"^(PyObject_Vectorcall\w*|_PyObject_VectorcallTstate|_PyObject_MakeTpCall|"
    r"\w*vectorcall_(FASTCALL\w*|O|NOARGS|VARARGS)|method_vectorcall|CPyPy_\w+)$"
)
_OWN = re.compile(r"^CPyDef_(?P<name>\w+)$")
# How the kernel is entered: a system call, an interrupt or exception.
_KERNEL_ENTRIES = ("entry_SYSCALL", "asm_")


def stacks_of(script_output: str) -> list[list[str]]:
    """``perf script -F ip,sym`` output as one list of symbols per sample, leaf first."""
    stacks: list[list[str]] = []
    current: list[str] = []
    for line in script_output.splitlines():
        fields = line.split()
        if not fields:
            if current:
                stacks.append(current)
            current = []
            continue
        current.append(fields[1] if len(fields) > 1 else "?")
    if current:
        stacks.append(current)
    return stacks


def _callee(stack: list[str], index: int) -> str:
    below = index - 1
    while below >= 0 and (_CALL_WRAPPERS.match(stack[below]) or "(inlined)" in stack[below]):
        below -= 1
    return stack[below] if below >= 0 else "(itself)"


def summarize(stacks: list[list[str]], top: int = 30, callees: int = 6) -> str:
    """Inclusive share of each compiled function, with its main callees."""
    total = max(len(stacks), 1)
    inclusive: Counter[str] = Counter()
    below: dict[str, Counter[str]] = {}
    for stack in stacks:
        seen: set[str] = set()
        for index, symbol in enumerate(stack):
            own = _OWN.match(symbol)
            if own is None or symbol in seen:
                continue
            seen.add(symbol)
            inclusive[symbol] += 1
            below.setdefault(symbol, Counter())[_callee(stack, index)] += 1
    kernel = sum(1 for stack in stacks if any(s.startswith(_KERNEL_ENTRIES) for s in stack))
    lines = [f"samples: {len(stacks)} (in the kernel: {100 * kernel / total:.1f}%)", ""]
    for symbol, count in inclusive.most_common(top):
        name = _OWN.match(symbol)
        assert name is not None
        lines.append(f"{100 * count / total:5.1f}%  {name.group('name')}")
        for callee, n in below[symbol].most_common(callees):
            short = _OWN.sub(r"\g<name>", callee)
            lines.append(f"          {100 * n / total:5.1f}%  {short}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description="perf profile of the compiled tenantgate")
    parser.add_argument("--case", default="W4-enforce", help="a workloads.CASES key")
    parser.add_argument("--protocol", default="simple")
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--event",
        default="cycles",
        help="what a sample counts, e.g. cache-misses:u (where the cache misses happen)",
    )
    args = parser.parse_args()
    if shutil.which("perf") is None:
        print("perf is not installed: apt-get install -y linux-perf", file=sys.stderr)
        return 2
    case = next(c for c in CASES if c.key == args.case)
    with contextlib.ExitStack() as stack:
        workdir, proxy, scale = start_services(
            stack, case.mode, pure=False, prefix="tenantgate-perf-"
        )
        script = workdir / "case.sql"
        script.write_text(case.proxy_script)
        bench = pgbench(proxy, args.protocol, args.clients, args.seconds + 6, script, scale)
        stack.callback(stop_process, bench)  # type: ignore[arg-type]
        time.sleep(3)  # connected and warm
        data = workdir / "perf.data"
        before = process_cpu(proxy.pid)
        subprocess.run(
            ["perf", "record", "-e", args.event, "--call-graph", "dwarf,16384", "-F", "300",
             "-o", str(data), "-p", str(proxy.pid), "--", "sleep", str(args.seconds)],
            check=True, capture_output=True,
        )  # fmt: skip
        after = process_cpu(proxy.pid)
        user, system = after[0] - before[0], after[1] - before[1]
        output, _ = bench.communicate(timeout=args.seconds + 60)
        tps = re.search(r"^tps = ([0-9.]+)", output, re.M)
        script_output = subprocess.run(
            ["perf", "script", "-i", str(data), "-F", "ip,sym"],
            check=True, capture_output=True, text=True,
        ).stdout  # fmt: skip
    header = (
        f"{case.key} {args.protocol}, {args.clients} clients, perf 300 Hz DWARF stacks "
        f"({args.event}) for "
        f"{args.seconds} s on tenantgate ({tenantgate.COMPILED_WHY}); pgbench "
        f"{tps.group(1) if tps else '?'} tps; tenantgate CPU user {user:.2f} s + system "
        f"{system:.2f} s.  Per compiled function: share of all samples in it and below it, "
        f"then its direct callees (C-API call wrappers skipped; _PyEval_Vector = an "
        f"interpreted callee; __pyx_..._write = the socket send).\n\n"
    )
    text = header + summarize(stacks_of(script_output))
    out = args.out or (
        Path(__file__).resolve().parent / "results" / f"profile-perf-{case.key}-{args.protocol}.txt"
    )
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    run_command(main)
