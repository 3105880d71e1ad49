"""Dockerfile: it cannot be built here, so check what a build and common lint rules need.

Every COPY source exists (and is not excluded by .dockerignore), the base image
is pinned, the image runs as a non-root user, pip and apt leave no cache, the
health check uses /healthz without curl, the documented ports are exposed, and
the default command runs in this environment (``--help``).
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    args: str
    line: int


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined; comments and blank lines dropped."""
    out: list[Instruction] = []
    buffer = ""
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not buffer and (not stripped or stripped.startswith("#")):
            continue
        if buffer and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if not buffer:
            start = number
        if stripped.endswith("\\"):
            buffer += stripped[:-1].rstrip() + " "
            continue
        buffer += stripped
        keyword, _, args = buffer.partition(" ")
        out.append(Instruction(keyword.upper(), args.strip(), start))
        buffer = ""
    assert not buffer, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list)
    assert all(isinstance(item, str) for item in value)
    return value


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics (last match wins, ``!`` re-includes, a dir covers its contents)."""
    ignored = False
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        matched = any(
            fnmatch.fnmatchcase(prefix, pat)
            or (pat.startswith("**/") and fnmatch.fnmatchcase(prefix.split("/")[-1], pat[3:]))
            for prefix in prefixes
        )
        if matched:
            ignored = not negate
    return ignored


def _dockerignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _copy_sources(instruction: Instruction) -> list[str]:
    tokens = shlex.split(instruction.args)
    tokens = [t for t in tokens if not t.startswith("--")]
    return tokens[:-1]


def test_parser_joins_continuations() -> None:
    parsed = parse_dockerfile('FROM a:1\n# c\nRUN x \\\n    && y\nCMD ["z"]\n')
    assert [(i.keyword, i.args) for i in parsed] == [
        ("FROM", "a:1"),
        ("RUN", "x && y"),
        ("CMD", '["z"]'),
    ]


def test_dockerignore_matcher() -> None:
    patterns = ["*", "!proxy/", "**/__pycache__"]
    assert _ignored("tests/unit", patterns)
    assert not _ignored("proxy/tenantgate/app.py", patterns)
    assert _ignored("proxy/tenantgate/__pycache__", patterns)


def test_every_copy_source_exists_and_is_in_the_context(instructions: list[Instruction]) -> None:
    patterns = _dockerignore_patterns()
    copies = [i for i in instructions if i.keyword in ("COPY", "ADD")]
    assert copies, "the Dockerfile copies nothing"
    checked = 0
    for copy in copies:
        assert copy.keyword == "COPY", f"line {copy.line}: use COPY, not ADD"
        if "--from=" in copy.args:
            continue  # from a build stage, not the context
        for source in _copy_sources(copy):
            assert (ROOT / source).exists(), f"line {copy.line}: {source} does not exist"
            assert not _ignored(source, patterns), (
                f"line {copy.line}: {source} is excluded by .dockerignore"
            )
            checked += 1
    assert checked >= 3


def test_the_package_sources_are_copied(instructions: list[Instruction]) -> None:
    sources = {s.rstrip("/") for i in instructions if i.keyword == "COPY" for s in _copy_sources(i)}
    # pyproject.toml names README.md as the readme: the build needs all three.
    assert {"pyproject.toml", "README.md", "proxy"} <= sources


def test_base_images_are_pinned(instructions: list[Instruction]) -> None:
    stages: set[str] = set()
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert froms
    for instruction in froms:
        tokens = [t for t in instruction.args.split() if not t.startswith("--")]
        image = tokens[0]
        if len(tokens) >= 3 and tokens[1].upper() == "AS":
            stages.add(tokens[2])
        if image in stages:
            continue
        name, _, digest = image.partition("@")
        _repo, _, tag = name.rpartition(":") if ":" in name.split("/")[-1] else (name, "", "")
        assert tag, f"line {instruction.line}: {image} has no tag"
        assert tag != "latest", f"line {instruction.line}: {image} uses latest"
        assert re.search(r"\d+\.\d+", tag), f"line {instruction.line}: tag {tag} has no version"
        if digest:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), digest
        assert "slim" in tag, "a slim base keeps the image small"


def test_runs_as_a_non_root_user_before_cmd(instructions: list[Instruction]) -> None:
    keywords = [i.keyword for i in instructions]
    last_from = max(n for n, k in enumerate(keywords) if k == "FROM")
    cmd = max(n for n, k in enumerate(keywords) if k == "CMD")
    users = [i for i in instructions[last_from:cmd] if i.keyword == "USER"]
    assert users, "no USER in the final stage before CMD"
    user = users[-1].args.split(":")[0]
    assert user not in ("root", "0"), "the final USER is root"
    assert all(i.keyword != "USER" for i in instructions[cmd:]), "USER changes after CMD"


def test_no_package_cache_left_behind(instructions: list[Instruction]) -> None:
    runs = [i for i in instructions if i.keyword == "RUN"]
    for run in runs:
        for command in re.split(r"&&|;", run.args):
            words = command.split()
            if "pip" in " ".join(words[:3]) and "install" in words:
                assert "--no-cache-dir" in words, f"line {run.line}: pip install without cache off"
            if words[:1] in (["apt-get"], ["apt"]) and "install" in words:
                assert "--no-install-recommends" in words, f"line {run.line}"
        if "apt-get install" in run.args or "apt install" in run.args:
            assert "rm -rf /var/lib/apt/lists" in run.args, (
                f"line {run.line}: apt lists must be removed in the same RUN"
            )


def test_ports_healthcheck_and_command(instructions: list[Instruction]) -> None:
    exposed = {p for i in instructions if i.keyword == "EXPOSE" for p in i.args.split()}
    assert {"6432", "9187"} <= exposed
    health = [i for i in instructions if i.keyword == "HEALTHCHECK"]
    assert len(health) == 1
    assert "/healthz" in health[0].args
    assert "9187" in health[0].args
    assert "curl" not in health[0].args
    assert "wget" not in health[0].args
    check_form = health[0].args[health[0].args.index("CMD") + 3 :].strip()
    check = _exec_form(check_form)
    assert check[:2] == ["python", "-c"]
    compile(check[2], "<healthcheck>", "exec")  # the inline script is valid Python
    cmd = [i for i in instructions if i.keyword == "CMD"]
    assert _exec_form(cmd[-1].args) == [
        "tenantgate",
        "serve",
        "--config",
        "/etc/tenantgate/policy.yaml",
    ]


def test_the_default_command_runs_here(instructions: list[Instruction]) -> None:
    cmd = _exec_form([i for i in instructions if i.keyword == "CMD"][-1].args)
    assert cmd[0] == "tenantgate"
    script = Path(sys.executable).parent / "tenantgate"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "tenantgate"]
    done = subprocess.run(
        [*base, cmd[1], "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--config" in done.stdout
    # Every option of the default command is one the CLI knows.
    for option in (token for token in cmd[2:] if token.startswith("--")):
        assert option in done.stdout
