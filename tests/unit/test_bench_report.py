"""benchmarks/report.py's medians, ratios and tables, with and without the reference
forwarder, and run.py's interleaving order (no database, no pgbench)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from report import markdown, summarize, target_lines
from run import targets_for
from workloads import FLOOR, Measurement

# Three rounds of W1-enforce simple at 8 clients: the medians are the middle values.
TPS_8 = {
    "direct": (1000.0, 1100.0, 1050.0),
    "pgbouncer": (900.0, 1000.0, 950.0),
    FLOOR: (850.0, 920.0, 870.0),
    "tenantgate": (800.0, 860.0, 830.0),
}


P99_MET = {"direct": 1.0, "tenantgate": 1.3}  # tenantgate adds 0.3 ms, the others 0.1


def _runs(
    targets: dict[str, tuple[float, ...]], clients: int, p99s: dict[str, float] = P99_MET
) -> list[Measurement]:
    runs = []
    for target, values in targets.items():
        for round_no, tps in enumerate(values, 1):
            p99 = p99s.get(target, 1.1)
            runs.append(
                Measurement(
                    "W1-enforce", "simple", clients, target, round_no, tps, 0.5, p99, 100, 0, True
                )
            )
    return runs


def _result(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "command": "run.py",
        "started": "now",
        "elapsed_s": 1.0,
        "machine": {
            "nproc": 2,
            "cpu": "cpu",
            "postgres": "15",
            "pgbouncer": "PgBouncer",
            "python": "3.11",
            "pgbench": "pgbench",
        },
        "config": {"rounds": 3, "duration": 3},
        "summary": rows,
        "targets": target_lines(rows, None),
    }


def test_the_forwarder_runs_before_tenantgate_at_8_clients_only() -> None:
    assert targets_for(8, True) == ("direct", "pgbouncer", FLOOR, "tenantgate")
    assert targets_for(64, True) == ("direct", "pgbouncer", "tenantgate")
    assert targets_for(8, False) == ("direct", "pgbouncer", "tenantgate")


def test_rows_with_the_forwarder_carry_its_ratios() -> None:
    runs = _runs(TPS_8, 8) + _runs({k: v for k, v in TPS_8.items() if k != FLOOR}, 64)
    rows = summarize(runs)
    eight, sixty_four = rows
    assert (eight["clients"], sixty_four["clients"]) == (8, 64)
    assert eight["tenantgate"]["tps"] == 830.0
    assert eight[FLOOR]["tps"] == 870.0
    assert eight["ratio_pgbouncer"] == pytest.approx(830 / 950)
    assert eight["floor_ratio_pgbouncer"] == pytest.approx(870 / 950)
    assert eight["ratio_floor"] == pytest.approx(830 / 870)
    assert eight["p99_added_ms"] == pytest.approx(0.3)
    assert not eight["meets_ratio"]  # 0.87 < 0.9
    assert eight["meets_p99"]
    assert FLOOR not in sixty_four
    assert "ratio_floor" not in sixty_four

    text = markdown(_result(rows))
    assert "direct / PgBouncer / forwarder / tenantgate" in text
    assert "| tg/PgB | tg/direct | fwd/PgB | tg/fwd |" in text
    eight_line = next(
        line for line in text.splitlines() if line.startswith("| W1-enforce | simple | 8 |")
    )
    assert "| 0.87 | 0.79 | 0.92 | 0.95 |" in eight_line
    sixty_four_line = next(
        line for line in text.splitlines() if line.startswith("| W1-enforce | simple | 64 |")
    )
    assert "| 0.87 | 0.79 | | |" in sixty_four_line  # no forwarder at 64 clients
    header = next(line for line in text.splitlines() if line.startswith("| case |"))
    assert header.count("|") == eight_line.count("|") == sixty_four_line.count("|")
    assert (
        "- W1-enforce >= 0.9x PgBouncer: NOT MET (simple 0.87x; the bare forwarder: simple 0.92x)"
        in text
    )


def test_results_without_the_forwarder_render_as_before() -> None:
    rows = summarize(_runs({k: v for k, v in TPS_8.items() if k != FLOOR}, 8))
    text = markdown(_result(rows))
    assert "forwarder" not in text
    assert "fwd" not in text
    header = next(line for line in text.splitlines() if line.startswith("| case |"))
    row = next(line for line in text.splitlines() if line.startswith("| W1-enforce |"))
    assert header.count("|") == row.count("|") == 13


def test_a_missed_p99_is_shown_beside_what_pgbouncer_and_the_forwarder_add() -> None:
    p99s = {"direct": 1.0, "pgbouncer": 1.7, FLOOR: 1.45, "tenantgate": 1.9}
    (missed,) = summarize(_runs(TPS_8, 8, p99s))
    assert not missed["meets_p99"]
    assert missed["p99_added_ms"] == pytest.approx(0.9)
    assert missed["pgbouncer_p99_added_ms"] == pytest.approx(0.7)
    assert missed["floor_p99_added_ms"] == pytest.approx(0.45)

    text = markdown(_result([missed]))
    row = next(line for line in text.splitlines() if line.startswith("| W1-enforce |"))
    assert row.endswith("**p99 missed** (<= 0.5 ms; PgBouncer adds 0.700, the forwarder 0.450) |")
    assert (
        "- p99 added over direct <= 0.5 ms: NOT MET (worst 0.900 ms in W1-enforce simple; "
        "met in 0/1; W1-enforce simple 0.900: PgBouncer adds 0.700, the forwarder 0.450)"
    ) in text


def test_a_met_p99_names_no_one_else() -> None:
    rows = summarize(_runs({k: v for k, v in TPS_8.items() if k != FLOOR}, 8))
    text = markdown(_result(rows))
    assert "p99 met (<= 0.5 ms) |" in text
    assert "adds" not in text
    assert (
        "- p99 added over direct <= 0.5 ms: MET (worst 0.300 ms in W1-enforce simple; met in 1/1)"
    ) in text


def test_a_miss_that_rounds_to_the_target_is_shown_with_three_places() -> None:
    just_under = {"direct": (1000.0,), "pgbouncer": (1000.0,), "tenantgate": (896.0,)}
    (missed,) = summarize(_runs(just_under, 8))
    assert not missed["meets_ratio"]
    text = markdown(_result([missed]))
    row = next(line for line in text.splitlines() if line.startswith("| W1-enforce |"))
    assert "| 1,000 | 896 | 0.896 | 0.90 |" in row  # tg/direct has no target: two places
    assert "- W1-enforce >= 0.9x PgBouncer: NOT MET (simple 0.896x)" in text

    at_target = {"direct": (1000.0,), "pgbouncer": (1000.0,), "tenantgate": (900.0,)}
    (met,) = summarize(_runs(at_target, 8))
    assert met["meets_ratio"]
    assert "- W1-enforce >= 0.9x PgBouncer: MET (simple 0.90x)" in markdown(_result([met]))
