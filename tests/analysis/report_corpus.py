"""Prints corpus counts: ``.venv/bin/python tests/analysis/report_corpus.py``."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "proxy"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from analysis_corpus import POLICY, RLS_POLICY, judge, load_cases


def main() -> int:
    per_file: Counter[tuple[str, str]] = Counter()
    mismatches = 0
    for case in load_cases():
        verdict, rule = judge(case, POLICY, RLS_POLICY)
        ok = verdict == case.verdict and (
            case.rule is None or case.verdict == "allowed" or rule == case.rule
        )
        per_file[(case.file, "total")] += 1
        per_file[(case.file, "expected_" + case.verdict)] += 1
        if not ok:
            mismatches += 1
            per_file[(case.file, "mismatch")] += 1
            print(
                f"MISMATCH {case.id}: expected {case.verdict}/{case.rule}, got "
                f"{verdict}/{rule}: {case.sql[:120]!r}"
            )
    for name in sorted({f for f, _ in per_file}):
        print(
            f"{name:40} total={per_file[(name, 'total')]:4} "
            f"rejected={per_file[(name, 'expected_rejected')]:4} "
            f"allowed={per_file[(name, 'expected_allowed')]:4} "
            f"mismatch={per_file[(name, 'mismatch')]}"
        )
    print(f"mismatches: {mismatches}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
