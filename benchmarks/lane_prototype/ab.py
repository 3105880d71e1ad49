"""Measure the lane prototype: ``cpu_cost.py`` with its ``tenantgate-pure`` target
replaced by pure-Python tenantgate with the C lane patched in.

    .venv/bin/python benchmarks/lane_prototype/ab.py --rounds 3 --seconds 5 \\
        --cases W1-enforce --protocols prepared \\
        --targets pgbouncer,forwarder,tenantgate,tenantgate-pure [--counters]

In the output, ``tenantgate-pure`` is the prototype.  The extension is built
with the C compiler Python was built with into a temporary directory.
"""

from __future__ import annotations

import os
import runpy
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = HERE.parent
sys.path.insert(0, str(BENCHMARKS))

import services  # noqa: E402


def build(into: Path) -> None:
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    include = sysconfig.get_paths()["include"]
    subprocess.run(
        [*compiler, "-O2", "-Wall", "-shared", "-fPIC", f"-I{include}", "-o",
         str(into / f"_lane{suffix}"), str(HERE / "_lane.c")],
        check=True,
    )  # fmt: skip


def main() -> None:
    build_dir = Path(tempfile.mkdtemp(prefix="tenantgate-lane-"))
    build(build_dir)
    original_start = services.Tenantgate.start

    def start(self: services.Tenantgate) -> None:
        if self.pure:  # the prototype: pure-Python tenantgate with the lane patched in
            self.launcher = (sys.executable, str(HERE / "launch.py"))
            self.extra_env = {"PYTHONPATH": os.pathsep.join((str(build_dir), str(HERE)))}
        original_start(self)

    services.Tenantgate.start = start  # type: ignore[method-assign]
    sys.argv = [str(BENCHMARKS / "cpu_cost.py"), *sys.argv[1:]]
    runpy.run_path(str(BENCHMARKS / "cpu_cost.py"), run_name="__main__")


if __name__ == "__main__":
    main()
