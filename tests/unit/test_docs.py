"""The documentation cannot rot: it is checked against the code.

* docs/policy.md documents every key of the policy model (walked recursively),
  documents no key that does not exist, and states each default correctly.
* Every YAML example that is a whole policy (README, docs, config/) validates.
* Every ``tenantgate ...`` command in a shell block of README.md and docs/*.md
  parses with the real CLI parser, and the safe ones (``--help``,
  ``hash-password``, ``explain`` and ``rls-sql`` against files in the
  repository) are run.
* Relative links point at files that exist.
* README's quickstart is exactly the two commands the project promises.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import subprocess
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from tenantgate.cli import _parser
from tenantgate.config import Policy, load_policy, parse_policy

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
MARKDOWN = [README, *DOCS]
POLICY_MD = ROOT / "docs" / "policy.md"
CONFIGS = sorted((ROOT / "config").glob("*.yaml"))
# Values for every ${VAR} the examples use.
ENV = {
    "APP_DB_PASSWORD": "example",
    "ACME_DB_PASSWORD": "example",
    "GLOBEX_DB_PASSWORD": "example",
}
# Placeholders docs/policy.md uses for mapping keys chosen by the user.
PLACEHOLDERS = {"tenants": "<tenant>", "users": "<user>"}
# Files other work streams are writing now; links to them may dangle until they land.
MINIMAL_POLICY: dict[str, Any] = {
    "upstream": {"database": "app", "user": "app_tenant"},
    "tenants": {"acme": {"users": {"acme_app": {"password": "example"}}}},
}
QUICKSTART_DEMO = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[demo]' && .venv/bin/tenantgate demo"
)
QUICKSTART_TESTS = "bash tests/run.sh"


# --- the policy model -----------------------------------------------------------------


@dataclass(frozen=True)
class Key:
    path: str
    required: bool
    default: Any


def _models_in(annotation: Any) -> tuple[list[type[BaseModel]], list[type[BaseModel]]]:
    """(nested models, models that are the values of a dict) inside an annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        nested: list[type[BaseModel]] = []
        values: list[type[BaseModel]] = []
        for arg in typing.get_args(annotation):
            n, v = _models_in(arg)
            nested += n
            values += v
        return nested, values
    if origin is dict:
        value = typing.get_args(annotation)[1]
        if isinstance(value, type) and issubclass(value, BaseModel):
            return [], [value]
        return [], []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation], []
    return [], []


def model_keys(model: type[BaseModel] = Policy, prefix: str = "") -> Iterator[Key]:
    """Every key path of the policy file, e.g. ``tenants.<tenant>.limits.max_connections``."""
    for name, info in model.model_fields.items():
        path = prefix + name
        required = info.is_required()
        default = None if required else info.get_default(call_default_factory=True)
        yield Key(path, required, default)
        nested, values = _models_in(info.annotation)
        for sub in nested:
            yield from model_keys(sub, path + ".")
        for sub in values:
            yield from model_keys(sub, f"{path}.{PLACEHOLDERS.get(name, '<key>')}.")


_KEY_CELL = re.compile(r"^`([^`]+)`$")


def documented_keys() -> dict[str, str]:
    """key path -> the default cell, from the reference tables of docs/policy.md.

    A reference row is ``| `key.path` | type | default | meaning |`` (``\\|`` inside
    a cell is an escaped pipe).
    """
    out: dict[str, str] = {}
    for line in POLICY_MD.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        match = _KEY_CELL.match(cells[0]) if len(cells) == 4 else None
        if match:
            path = match.group(1)
            assert path not in out, f"policy.md documents {path} twice"
            out[path] = cells[2]
    return out


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def test_model_walk_finds_nested_keys() -> None:
    paths = {key.path for key in model_keys()}
    assert "listen.tls.cert" in paths
    assert "tenants.<tenant>.users.<user>.password" in paths
    assert "tenants.<tenant>.limits.max_connections" in paths
    assert len(paths) > 40


def test_policy_md_documents_every_key() -> None:
    documented = documented_keys()
    missing = [key.path for key in model_keys() if key.path not in documented]
    assert not missing, f"docs/policy.md does not document: {missing}"


def test_policy_md_documents_no_key_that_does_not_exist() -> None:
    known = {key.path for key in model_keys()}
    unknown = sorted(set(documented_keys()) - known)
    assert not unknown, f"docs/policy.md documents keys the model does not have: {unknown}"


def test_policy_md_states_every_default() -> None:
    documented = documented_keys()
    for key in model_keys():
        cell = documented[key.path]
        if key.required:
            assert "required" in cell, f"{key.path}: required, documented as {cell!r}"
        elif key.default is None:
            assert "unset" in cell, f"{key.path}: unset by default, documented as {cell!r}"
        elif isinstance(key.default, BaseModel):
            assert "see below" in cell, f"{key.path}: a section, documented as {cell!r}"
        elif isinstance(key.default, dict | tuple | list):
            expected = "{}" if isinstance(key.default, dict) else "[]"
            assert not key.default, key.path
            assert f"`{expected}`" in cell, f"{key.path}: default {expected}, not {cell!r}"
        else:
            shown = re.findall(r"`([^`]*)`", cell)
            assert shown, f"{key.path}: no default shown in {cell!r}"
            assert shown[0] == _yaml_scalar(key.default), (
                f"{key.path}: default is {_yaml_scalar(key.default)!r}, documented {shown[0]!r}"
            )


# --- YAML examples --------------------------------------------------------------------


def _fenced(path: Path, languages: set[str]) -> Iterator[tuple[int, str]]:
    """(line number, body) of every fenced block in one of ``languages``."""
    lines = path.read_text(encoding="utf-8").splitlines()
    inside: str | None = None
    start = 0
    body: list[str] = []
    for number, line in enumerate(lines, start=1):
        fence = re.match(r"^\s*```\s*([A-Za-z0-9_-]*)", line)
        if fence and inside is None:
            inside, start, body = fence.group(1).lower(), number, []
        elif fence and inside is not None:
            if inside in languages:
                yield start, "\n".join(body)
            inside = None
        elif inside is not None:
            body.append(line)
    assert inside is None, f"{path.name}: unclosed code fence at line {start}"


def _yaml_blocks() -> Iterator[tuple[str, str]]:
    for path in MARKDOWN:
        for line, body in _fenced(path, {"yaml", "yml"}):
            yield f"{path.relative_to(ROOT)}:{line}", body


@pytest.mark.parametrize(("where", "body"), list(_yaml_blocks()))
def test_yaml_examples_are_valid(where: str, body: str) -> None:
    data = yaml.safe_load(body)  # every YAML example parses
    if not isinstance(data, dict):
        return
    known = {key.path.split(".")[0] for key in model_keys()}
    if {"upstream", "tenants"} <= set(data):
        parse_policy(body, where, env=ENV)  # a whole policy: it must validate
    elif set(data) <= known:
        # A fragment of a policy: it must validate inside a minimal one.
        merged = {**MINIMAL_POLICY, **data}
        parse_policy(yaml.safe_dump(merged), where, env=ENV)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_example_configs_validate(path: Path) -> None:
    policy = load_policy(path, env=ENV)
    assert policy.tenants


def test_the_contract_example_is_there() -> None:
    assert {p.name for p in CONFIGS} >= {"example.yaml", "minimal.yaml", "rls-only.yaml"}
    policy = load_policy(ROOT / "config" / "example.yaml", env=ENV)
    assert policy.mode == "both"
    assert policy.upstream.password == ENV["APP_DB_PASSWORD"]
    assert not policy.plaintext_users()


# --- commands -------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    where: str
    argv: tuple[str, ...]  # without the leading "tenantgate"


def _logical_lines(body: str) -> Iterator[str]:
    pending = ""
    for line in body.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield pending + line
        pending = ""
    if pending:
        yield pending


def _commands_in(text: str) -> Iterator[tuple[str, ...]]:
    for line in _logical_lines(text):
        stripped = line.strip().removeprefix("$ ")
        if not stripped or stripped.startswith("#"):
            continue
        tokens = shlex.split(stripped, comments=True)
        # One pipeline stage / list element at a time.
        stage: list[str] = []
        for token in [*tokens, "|"]:
            if token in ("|", "&&", "||", ";"):
                while stage and re.match(r"^[A-Z_][A-Z0-9_]*=", stage[0]):
                    stage.pop(0)  # VAR=value prefixes
                if stage and stage[0] in ("tenantgate", ".venv/bin/tenantgate"):
                    yield tuple(stage[1:])
                stage = []
            else:
                stage.append(token)


def documented_commands() -> list[Command]:
    found: list[Command] = []
    for path in MARKDOWN:
        for line, body in _fenced(path, {"sh", "bash", "shell", "console"}):
            for argv in _commands_in(body):
                found.append(Command(f"{path.relative_to(ROOT)}:{line}", argv))
    return found


def test_command_extraction() -> None:
    text = "APP=1 tenantgate rls-sql --config a.yaml | psql x \\\n  -v y\n# tenantgate no\n"
    assert list(_commands_in(text)) == [("rls-sql", "--config", "a.yaml")]
    text = "python3 -m venv .venv && .venv/bin/tenantgate demo"
    assert list(_commands_in(text)) == [("demo",)]


def test_docs_show_commands() -> None:
    commands = documented_commands()
    used = {c.argv[0] for c in commands if c.argv}
    assert {"demo", "serve", "check", "explain", "rls-sql", "hash-password"} <= used


def _parse(argv: tuple[str, ...]) -> argparse.Namespace:
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return _parser().parse_args(list(argv))
    except SystemExit as exc:
        raise AssertionError(f"tenantgate {' '.join(argv)}: {stderr.getvalue()}") from exc


def _safe_to_run(argv: tuple[str, ...]) -> bool:
    if "--help" in argv or "-h" in argv:
        return True
    if argv[:1] == ("hash-password",):
        return True
    if argv[:1] in (("explain",), ("rls-sql",)):
        config = argv[argv.index("--config") + 1]
        return (ROOT / config).is_file()
    return False


@pytest.mark.parametrize(
    "command", documented_commands(), ids=lambda c: f"{c.where} {' '.join(c.argv)}"[:90]
)
def test_documented_command(command: Command) -> None:
    argv = command.argv
    if "--help" not in argv and "-h" not in argv:
        _parse(argv)  # every documented command line is one the CLI accepts
    if not _safe_to_run(argv):
        return
    done = subprocess.run(
        [sys.executable, "-m", "tenantgate", *argv],
        input="example-password\n",
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", **ENV},
        timeout=120,
        check=False,
    )
    allowed = (0, 1) if argv[0] == "explain" else (0,)
    assert done.returncode in allowed, f"{command.where}: {done.stderr}"
    assert "Traceback" not in done.stderr
    if argv[0] == "hash-password" and "--help" not in argv:
        assert done.stdout.startswith("SCRAM-SHA-256$")
    if argv[0] == "rls-sql" and "--help" not in argv:
        assert "ENABLE ROW LEVEL SECURITY" in done.stdout
    if argv[0] == "explain" and "--help" not in argv:
        assert done.stdout.startswith("mode: ")


# --- links and the quickstart -----------------------------------------------------------


def _links(path: Path) -> Iterator[tuple[str, str]]:
    text = path.read_text(encoding="utf-8")
    for match in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = match.group(1)
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        yield target.split("#", 1)[0], target


@pytest.mark.parametrize("path", MARKDOWN, ids=[p.name for p in MARKDOWN])
def test_relative_links_resolve(path: Path) -> None:
    for file_part, target in _links(path):
        resolved = (path.parent / file_part).resolve()
        assert resolved.exists(), f"{path.name}: broken link {target}"


def test_readme_quickstart_is_the_promised_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    blocks = [body.strip() for _, body in _fenced(README, {"sh"})]
    assert QUICKSTART_DEMO in blocks
    assert QUICKSTART_TESTS in blocks
    assert text.index(QUICKSTART_DEMO) < text.index(QUICKSTART_TESTS)
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "tests/run.sh" in ci


def test_readme_covers_what_a_newcomer_needs() -> None:
    text = README.read_text(encoding="utf-8")
    for needle in (
        "PgBouncer",
        "PgDog",
        "Supavisor",
        "pgvpd",
        "transaction pooling",
        "docs/security.md",
        "GPL-3.0-or-later",
        "dry_run",
    ):
        assert needle in text, needle
    for mode in ("`enforce`", "`rls`", "`both`"):
        assert mode in text
