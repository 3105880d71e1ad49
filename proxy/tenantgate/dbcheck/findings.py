"""What ``tenantgate check`` reports: findings, their severity, the exit code and the text."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

Severity = Literal["error", "warning"]


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in the database.

    ``code`` is a stable snake_case identifier (tests and scripts match on it);
    ``fix`` is the SQL (or the action) that removes the problem.
    """

    severity: Severity
    code: str
    message: str
    fix: str


def check_exit_code(findings: Iterable[Finding]) -> int:
    """0 when no finding is an error (the database is sound), else 1."""
    return 1 if any(f.severity == "error" for f in findings) else 0


def format_findings(findings: Sequence[Finding]) -> str:
    """Human-readable report: one block per finding, then a summary line."""
    lines: list[str] = []
    for finding in findings:
        lines.append(f"{finding.severity.upper()} [{finding.code}] {finding.message}")
        lines.append(f"    fix: {finding.fix}")
    errors = sum(1 for f in findings if f.severity == "error")
    warnings = len(findings) - errors
    if errors:
        lines.append(
            f"{errors} error(s), {warnings} warning(s): the database is NOT safe for rls mode"
        )
    else:
        lines.append(f"no errors, {warnings} warning(s): the database is sound for rls mode")
    return "\n".join(lines)
