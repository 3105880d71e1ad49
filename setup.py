"""Build hook: compile the per-message hot path with mypyc where a C compiler exists.

Everything else about the package is in pyproject.toml.  ``C_MODULES`` are
hand-written C (the steady-state lane), built with them and, like them, only
used while their source is what was compiled.  The modules below run
for every message a client or the server sends; compiled, they cost 5-15% less
CPU under load (``benchmarks/cpu_cost.py --targets tenantgate,tenantgate-pure``).
The same files stay importable as Python: without a compiler, with
``TENANTGATE_PURE_PYTHON=1`` at build time or run time, or when a source no
longer matches what was compiled (``_compiled_sources.json``, see
``proxy/tenantgate/compiled.py``), tenantgate runs as source, with the same
behaviour.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup

HOT_MODULES = (
    "tenantgate/session.py",
    "tenantgate/tracker.py",
    "tenantgate/enforcement.py",
    "tenantgate/telemetry.py",
    "tenantgate/metrics.py",
    "tenantgate/hooks.py",
    "tenantgate/injection.py",
    "tenantgate/limits.py",
    "tenantgate/protocol/framing.py",
    "tenantgate/protocol/frontend.py",
    "tenantgate/analysis/cache.py",
    "tenantgate/analysis/params.py",
    "tenantgate/analysis/shapes.py",
    "tenantgate/analysis/textshapes.py",
)
# Hand-written C (not mypyc): the steady-state lane, see its header comment.
C_MODULES = ("tenantgate/_lane.c",)


def _why_not_compile() -> str | None:
    if os.environ.get("TENANTGATE_PURE_PYTHON") == "1":
        return "TENANTGATE_PURE_PYTHON=1"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    if not (Path(sysconfig.get_paths()["include"]) / "Python.h").exists():
        return "no Python headers (Python.h)"
    return None


def _write_manifest() -> None:
    """Record what is compiled: tenantgate.compiled runs the extensions only while
    their sources still have these contents (see proxy/tenantgate/compiled.py)."""
    package = Path(__file__).resolve().parent / "proxy" / "tenantgate"
    digests = {
        module.removeprefix("tenantgate/"): hashlib.sha256(
            (package.parent / module).read_bytes()
        ).hexdigest()
        for module in (*HOT_MODULES, *C_MODULES)
    }
    (package / "_compiled_sources.json").write_text(json.dumps(digests, indent=1) + "\n")


def _remove_stale_extensions(built: list[Extension]) -> None:
    """Delete extension files in the source tree this build no longer makes.

    An editable build leaves the extensions of an earlier one in place: a module
    dropped from HOT_MODULES would keep its old compiled file (which
    tenantgate.compiled then refuses, so every module runs as source), and
    each change of the module set leaves a group library behind.
    """
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    root = Path(__file__).resolve().parent / "proxy"
    wanted = {f"{ext.name.replace('.', '/')}{suffix}" for ext in built}
    for path in [*root.glob(f"*{suffix}"), *(root / "tenantgate").rglob(f"*{suffix}")]:
        if path.relative_to(root).as_posix() not in wanted:
            path.unlink()


def _extensions() -> list[Extension]:
    reason = _why_not_compile()
    if reason is None:
        try:
            from mypyc.build import mypycify  # noqa: PLC0415 (a build requirement, maybe absent)
        except ImportError:
            reason = "mypyc is not installed"
        else:
            # proxy/ has no __init__.py, so mypyc names these tenantgate.session etc.
            # The build environment has mypy but not tenantgate's dependencies, so
            # the project's strict settings (checked by the test suite) are swapped
            # for lenient ones here: unknown imports are Any to the compiler.
            options = ["--config-file", os.devnull, "--ignore-missing-imports"]
            sources = [f"proxy/{m}" for m in HOT_MODULES]
            built = list(mypycify([*sources, *options], opt_level="3"))
            built += [
                Extension(
                    module.removesuffix(".c").replace("/", "."),
                    [f"proxy/{module}"],
                    extra_compile_args=["-O2"],
                )
                for module in C_MODULES
            ]
            _remove_stale_extensions(built)
            _write_manifest()
            return built
    print(f"tenantgate: building pure Python ({reason})", file=sys.stderr)
    return []


setup(ext_modules=_extensions())
