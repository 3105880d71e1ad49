"""benchmarks/cpu_cost.py's reading of a cluster's CPU: a pass over /proc during
which a backend exits must not be the one used (no database, no /proc)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import cpu_cost
from cpu_cost import ClusterRead, settled_ticks


@pytest.fixture(autouse=True)
def _no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_cost.time, "sleep", lambda _seconds: None)


def test_a_pass_that_lost_an_exiting_backend_is_not_used() -> None:
    # Backends 11 and 12 have 500 ticks each; the postmaster 100.  In the second
    # pass 12 exited after the postmaster was read and before its own entry: its
    # 500 ticks are counted nowhere.  Once reaped, they are the postmaster's.
    passes: list[ClusterRead] = [
        (1100, frozenset({11, 12})),
        (600, frozenset({11})),
        (1100, frozenset({11})),
    ]
    assert settled_ticks(lambda: passes.pop(0)) == 1100
    assert not passes


def test_a_quiet_cluster_is_read_twice() -> None:
    passes: list[ClusterRead] = [
        (700, frozenset({5})),
        (701, frozenset({5})),
        (999, frozenset({5})),
    ]
    assert settled_ticks(lambda: passes.pop(0)) == 701
    assert len(passes) == 1


def test_a_cluster_that_never_settles_gives_its_last_read() -> None:
    counter = iter(range(100))

    def churning() -> ClusterRead:
        n = next(counter)
        return n, frozenset({n})

    assert settled_ticks(churning, attempts=3) == 3
