"""A/B against an earlier commit: ``cpu_cost.py`` with its ``tenantgate-pure`` target
replaced by the compiled build of ``--baseline`` (a commit, tag or branch).

    .venv/bin/python benchmarks/baseline.py --baseline f7af6e4 --rounds 3 --seconds 5 \\
        --cases W1-enforce --protocols extended,prepared \\
        --targets pgbouncer,tenantgate,tenantgate-pure

In the output, ``tenantgate`` is the working tree (as installed in the venv)
and ``tenantgate-pure`` is the baseline, both compiled, so one interleaved run
measures a change with the box's drift cancelled.  The baseline is checked out
with ``git worktree`` and installed (compiled, not editable) into a directory
under the system temp dir, kept per commit for the next run.
"""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys
import tempfile
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(BENCHMARKS))

import services  # noqa: E402


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def install(commit: str) -> Path:
    """The baseline's compiled package directory (built once per commit)."""
    sha = _git("rev-parse", "--verify", f"{commit}^{{commit}}")
    home = Path(tempfile.gettempdir()) / f"tenantgate-baseline-{sha[:12]}"
    target = home / "site"
    if (target / "tenantgate" / "__init__.py").exists():
        return target
    checkout = home / "checkout"
    if not checkout.exists():
        _git("worktree", "add", "--detach", str(checkout), sha)
    print(f"building the baseline {sha[:12]} (compiled; about two minutes)", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(checkout)],
        check=True,
    )  # fmt: skip
    return target


def main() -> None:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--baseline", required=True)
    known, rest = parser.parse_known_args()
    site = install(known.baseline)
    check = subprocess.run(
        [sys.executable, "-c", "import tenantgate; print(tenantgate.COMPILED_WHY)"],
        env={**os.environ, "PYTHONPATH": str(site)},
        check=True,
        capture_output=True,
        text=True,
    )
    print(f"baseline {known.baseline}: {check.stdout.strip()}", flush=True)
    original_start = services.Tenantgate.start

    def start(self: services.Tenantgate) -> None:
        if self.pure:  # the baseline, compiled
            self.launcher = (sys.executable, "-m", "tenantgate")
            self.extra_env = {"PYTHONPATH": str(site), "TENANTGATE_PURE_PYTHON": "0"}
        original_start(self)

    services.Tenantgate.start = start  # type: ignore[method-assign]
    sys.argv = [str(BENCHMARKS / "cpu_cost.py"), *rest]
    runpy.run_path(str(BENCHMARKS / "cpu_cost.py"), run_name="__main__")


if __name__ == "__main__":
    main()
