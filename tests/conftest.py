"""Session-wide fixtures and hooks.

Fixtures:
* ``pg`` (session): a running :class:`tenantgate.cluster.Cluster`, started once.
  ``TENANTGATE_TEST_DSN`` (superuser URL) uses an existing server; otherwise a
  temporary cluster from ``TENANTGATE_TEST_PG`` (unset: system, else embedded;
  or ``system``, ``embedded``, ``15``, ``18``, a bin dir), with pg_stat_statements.
* ``tenant_db`` (session): the ``app`` database with RLS and seed data, as a
  :class:`support.db.TenantDb`.
* ``clean_tenant_db`` (function): ``tenant_db``, reseeded after the test.

Hooks: tests using ``pg`` get the ``postgres`` marker; every test fails if an
asyncio event loop reported an unhandled exception (``support.loopguard``).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Generator, Iterator

import pytest

from support.db import TenantDb, create_tenant_db
from support.loopguard import LOOP_GUARD, GuardedEventLoopPolicy
from support.pg import cluster_from_env, describe
from tenantgate.cluster import Cluster, ClusterError

_PG_FIXTURES = frozenset({"pg", "tenant_db", "clean_tenant_db"})


def pytest_configure(config: pytest.Config) -> None:
    asyncio.set_event_loop_policy(GuardedEventLoopPolicy(LOOP_GUARD))
    # SIGTERM (CI cancelling a job) would skip fixture teardown and leave the test
    # postmaster running: turn it into KeyboardInterrupt so finalizers and atexit run.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        uses_pg = _PG_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if uses_pg or "/integration/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.postgres)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    item.stash[_LOOPS_AT_START] = LOOP_GUARD.loops_created
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(
    item: pytest.Item, nextitem: pytest.Item | None
) -> Generator[None, None, None]:
    result = yield
    used_loop = LOOP_GUARD.loops_created != item.stash.get(_LOOPS_AT_START, -1)
    errors = LOOP_GUARD.take(collect=used_loop)
    if errors:
        pytest.fail(
            "unhandled exception(s) in the asyncio event loop:\n" + "\n\n".join(errors),
            pytrace=False,
        )
    return result


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    errors = LOOP_GUARD.take(collect=True)
    if errors:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        text = "unhandled asyncio exception(s) after the last test:\n" + "\n\n".join(errors)
        if reporter is not None:
            reporter.write_line(text, red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_LOOPS_AT_START = pytest.StashKey[int]()


@pytest.fixture(scope="session")
def pg() -> Iterator[Cluster]:
    """The session's PostgreSQL (superuser access via ``.dsn`` / ``.make_dsn()``)."""
    try:
        cluster = cluster_from_env()
    except ClusterError as exc:
        pytest.fail(f"cannot start PostgreSQL for the tests: {exc}", pytrace=False)
    try:
        print(f"\ntest server: {describe(cluster)}")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def tenant_db(pg: Cluster) -> TenantDb:
    """The ``app`` database: roles, scoped + shared tables, RLS, seed rows."""
    return create_tenant_db(pg)


@pytest.fixture
def clean_tenant_db(tenant_db: TenantDb) -> Iterator[TenantDb]:
    """``tenant_db`` for a test that changes data: the seed rows are restored afterwards."""
    yield tenant_db
    tenant_db.reseed()
