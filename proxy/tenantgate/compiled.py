"""Whether the mypyc-compiled hot path is in use, and the switch back to source.

Owns the choice between a module's compiled extension (built by ``setup.py``
next to its ``.py`` file) and its Python source.  The import system prefers an
extension, so an extension built from other source would silently run old
code after an edit; :func:`choose` therefore falls back to source for *every*
tenantgate module when any extension is stale (its ``.py`` no longer has the
SHA-256 ``setup.py`` recorded in :data:`MANIFEST` when it compiled it:
contents, not modification times, which a wheel install does not keep in
order), or when ``TENANTGATE_PURE_PYTHON=1`` asks for it.  All or nothing, because compiled
modules share native classes: a compiled module next to the source version of
its sibling would see two different classes of one name.

Runs from ``tenantgate/__init__.py``, before any other tenantgate module is
imported.  Imports nothing of tenantgate, except :func:`lane_class` when called.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tenantgate._lane import Lane

PURE_ENV = "TENANTGATE_PURE_PYTHON"
MANIFEST = "_compiled_sources.json"  # in the package: source path -> SHA-256 at compile time
_PACKAGE = "tenantgate"


def extensions(package_dir: Path) -> list[Path]:
    """Every compiled module (extension file) under ``package_dir``."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(p for p in package_dir.rglob("*") if p.name.endswith(suffixes))


def source_of(extension: Path) -> Path:
    """The file an extension was compiled from: its ``.py`` (``session.cpython-311-...so``)
    or, for hand-written C (``_lane``), its ``.c``."""
    stem = extension.name.split(".", 1)[0]
    source = extension.with_name(stem + ".py")
    c_source = extension.with_name(stem + ".c")
    return c_source if not source.exists() and c_source.exists() else source


def digest(source: Path) -> str:
    return hashlib.sha256(source.read_bytes()).hexdigest()


def stale(package_dir: Path, found: Sequence[Path]) -> list[Path]:
    """The extensions whose source is not what they were compiled from (all of them
    when the build left no readable manifest)."""
    try:
        recorded = json.loads((package_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return list(found)
    if not isinstance(recorded, dict):
        return list(found)
    out = []
    for extension in found:
        source = source_of(extension)
        if not source.exists():
            continue  # an install without sources: the extension is all there is
        key = source.relative_to(package_dir).as_posix()
        if recorded.get(key) != digest(source):
            out.append(extension)
    return out


class SourceOnlyFinder(importlib.abc.MetaPathFinder):
    """Finds tenantgate's modules as ``.py`` files only, ignoring extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(_PACKAGE + ".") or path is None:
            return None
        loader = (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, loader).find_spec(fullname)
            if spec is not None:
                return spec
        return None


def choose(package_dir: Path) -> tuple[bool, str]:
    """Decide how tenantgate's modules load; returns (compiled, why)."""
    found = extensions(package_dir)
    if not found:
        return False, "no compiled modules (pure Python install)"
    reason = ""
    if os.environ.get(PURE_ENV) == "1":
        reason = f"{PURE_ENV}=1"
    else:
        old = stale(package_dir, found)
        if old:
            name = source_of(old[0]).name
            reason = f"{name} is not what was compiled; rebuild with pip install"
    if reason:
        if not any(isinstance(f, SourceOnlyFinder) for f in sys.meta_path):
            sys.meta_path.insert(0, SourceOnlyFinder())
        return False, f"compiled modules ignored: {reason}"
    return True, f"{len(found)} compiled modules"


LANE_ENV = "TENANTGATE_LANE"


def lane_class() -> type[Lane] | None:
    """The steady-state lane (``_lane.c``) when the compiled build is in use and
    ``TENANTGATE_LANE=0`` does not turn it off; else None (sessions then take the
    Python path for every statement, with the same behaviour)."""
    import tenantgate  # noqa: PLC0415 (this module runs inside tenantgate's __init__)

    if not tenantgate.COMPILED or os.environ.get(LANE_ENV) == "0":
        return None
    try:
        from tenantgate._lane import Lane  # noqa: PLC0415
    except ImportError:
        return None
    return Lane
