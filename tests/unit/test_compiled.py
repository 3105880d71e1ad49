"""The choice between the compiled hot path and the Python source (tenantgate.compiled)."""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import tenantgate
from tenantgate import compiled

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


@pytest.fixture
def meta_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """sys.meta_path as the test leaves it; restored afterwards."""
    saved = list(sys.meta_path)
    monkeypatch.delenv(compiled.PURE_ENV, raising=False)
    yield sys.meta_path
    sys.meta_path[:] = saved


def _package(tmp_path: Path, *, edited: bool) -> Path:
    """A package with one compiled module and the manifest of its build; ``edited``:
    the source was changed after the build."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    source = package / "sub" / "hot.py"
    source.write_text("X = 1\n")
    manifest = {"sub/hot.py": compiled.digest(source)}
    (package / compiled.MANIFEST).write_text(json.dumps(manifest))
    extension = package / "sub" / f"hot{SUFFIX}"
    extension.write_bytes(b"not really an extension")
    (package / "cold.py").write_text("Y = 2\n")
    if edited:
        source.write_text("X = 2\n")
    # Modification times do not matter (a wheel install writes files in any order).
    now = source.stat().st_mtime
    os.utime(extension, (now - 10, now - 10))
    return package


def test_pure_install_has_nothing_to_choose(tmp_path: Path, meta_path: list[object]) -> None:
    (tmp_path / "a.py").write_text("")
    before = list(meta_path)
    assert compiled.choose(tmp_path) == (False, "no compiled modules (pure Python install)")
    assert meta_path == before


def test_fresh_extensions_are_used(tmp_path: Path, meta_path: list[object]) -> None:
    package = _package(tmp_path, edited=False)
    before = list(meta_path)
    assert compiled.extensions(package) == [package / "sub" / f"hot{SUFFIX}"]
    assert compiled.source_of(package / "sub" / f"hot{SUFFIX}") == package / "sub" / "hot.py"
    assert compiled.choose(package) == (True, "1 compiled modules")
    assert meta_path == before


def test_a_stale_extension_switches_everything_to_source(
    tmp_path: Path, meta_path: list[object]
) -> None:
    package = _package(tmp_path, edited=True)
    found = compiled.extensions(package)
    assert compiled.stale(package, found) == [package / "sub" / f"hot{SUFFIX}"]
    used, why = compiled.choose(package)
    assert not used
    assert "hot.py is not what was compiled" in why
    assert isinstance(meta_path[0], compiled.SourceOnlyFinder)
    compiled.choose(package)  # a second call does not stack a second finder
    assert sum(isinstance(f, compiled.SourceOnlyFinder) for f in meta_path) == 1


def test_a_hand_written_c_extension_is_checked_against_its_c_source(
    tmp_path: Path, meta_path: list[object]
) -> None:
    """The lane (``_lane.c``) has no ``.py``: its ``.c`` is what the manifest records."""
    package = _package(tmp_path, edited=False)
    c_source = package / "_lane.c"
    c_source.write_text("int x;\n")
    (package / f"_lane{SUFFIX}").write_bytes(b"not really an extension")
    manifest = json.loads((package / compiled.MANIFEST).read_text())
    manifest["_lane.c"] = compiled.digest(c_source)
    (package / compiled.MANIFEST).write_text(json.dumps(manifest))
    assert compiled.source_of(package / f"_lane{SUFFIX}") == c_source
    assert compiled.choose(package) == (True, "2 compiled modules")
    c_source.write_text("int y;\n")
    used, why = compiled.choose(package)
    assert not used
    assert "_lane.c is not what was compiled" in why


def test_without_a_manifest_every_extension_is_stale(
    tmp_path: Path, meta_path: list[object]
) -> None:
    package = _package(tmp_path, edited=False)
    found = compiled.extensions(package)
    (package / compiled.MANIFEST).write_text("not json")
    assert compiled.stale(package, found) == found
    (package / compiled.MANIFEST).unlink()
    assert compiled.stale(package, found) == found
    assert compiled.choose(package)[0] is False
    # An install without sources: nothing for the extension to be stale against.
    (package / compiled.MANIFEST).write_text(json.dumps({"sub/hot.py": "0" * 64}))
    (package / "sub" / "hot.py").unlink()
    assert compiled.stale(package, found) == []


def test_the_environment_asks_for_source(
    tmp_path: Path, meta_path: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    package = _package(tmp_path, edited=False)
    monkeypatch.setenv(compiled.PURE_ENV, "1")
    assert compiled.choose(package) == (False, "compiled modules ignored: TENANTGATE_PURE_PYTHON=1")
    assert isinstance(meta_path[0], compiled.SourceOnlyFinder)


def test_source_only_finder_skips_extensions_and_other_packages(tmp_path: Path) -> None:
    package = _package(tmp_path, edited=False)
    finder = compiled.SourceOnlyFinder()
    spec = finder.find_spec("tenantgate.hot", [str(package / "sub")])
    assert spec is not None
    assert spec.origin == str(package / "sub" / "hot.py")
    assert spec.name == "tenantgate.hot"
    assert finder.find_spec("tenantgate.missing", [str(package)]) is None
    assert finder.find_spec("other.hot", [str(package / "sub")]) is None
    assert finder.find_spec("tenantgate", None) is None  # the package itself: normal import


def _module_files(env: dict[str, str]) -> list[str]:
    code = (
        "import tenantgate, tenantgate.session, tenantgate.analysis.cache, "
        "tenantgate.protocol.framing\n"
        "print(tenantgate.COMPILED)\n"
        "for m in (tenantgate.session, tenantgate.analysis.cache, tenantgate.protocol.framing):\n"
        "    print(m.__file__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.split()


def test_the_installed_package_honours_the_switch() -> None:
    env = {k: v for k, v in os.environ.items() if k != compiled.PURE_ENV}
    pure = _module_files({**env, compiled.PURE_ENV: "1"})
    assert pure[0] == "False"
    assert all(path.endswith(".py") for path in pure[1:]), pure
    default = _module_files(env)
    found = compiled.extensions(Path(tenantgate.__file__).parent)
    package_dir = Path(tenantgate.__file__).parent
    assert default[0] == str(bool(found) and not compiled.stale(package_dir, found))
    if default[0] == "True":
        assert all(path.endswith(SUFFIX) for path in default[1:]), default


@pytest.mark.skipif(
    os.environ.get("TENANTGATE_EXPECT_COMPILED") != "1",
    reason="only where tests/run.sh found a C compiler and built the extensions",
)
def test_ci_runs_what_it_built() -> None:
    """tests/run.sh sets TENANTGATE_EXPECT_COMPILED after installing a C compiler: the
    suite must then run the compiled build (not a silent pure-Python fallback)."""
    assert tenantgate.COMPILED, tenantgate.COMPILED_WHY
    if os.environ.get(compiled.LANE_ENV) != "0":
        assert compiled.lane_class() is not None  # the steady-state lane is on
