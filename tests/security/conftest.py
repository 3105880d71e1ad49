"""Fixtures of the end-to-end isolation suite (``-m security``).

* ``security_db`` (session): ``tenant_db`` with the columns and constraints the
  corpus in ``tests/corpus/`` expects (``README.md`` there) added idempotently
  as superuser, plus a BYPASSRLS role ``tg_sec_enforce`` that the enforce-mode
  proxy uses as its upstream, so that in enforce mode the analyser is the
  *only* barrier between tenants (RLS would otherwise hide every mistake).
* ``proxy_both`` / ``proxy_enforce`` / ``proxy_rls`` (module): running proxies.

Nothing here edits ``tests/support``; every change to the shared database only
adds columns with defaults, one unique index, and a role of its own.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from security_support import BYPASS_PASSWORD, BYPASS_ROLE, enforce_only_overrides

from support.db import TenantDb
from support.proxy import RunningProxy

# Columns of the corpus schema (tests/corpus/README.md) that tests/support/db.py lacks.
_CORPUS_COLUMNS = """
ALTER TABLE orders
    ADD COLUMN IF NOT EXISTS customer_id bigint,
    ADD COLUMN IF NOT EXISTS plan_id integer,
    ADD COLUMN IF NOT EXISTS status text NOT NULL DEFAULT 'new',
    ADD COLUMN IF NOT EXISTS data jsonb NOT NULL DEFAULT '{}',
    ADD COLUMN IF NOT EXISTS created_at timestamptz NOT NULL DEFAULT now();
CREATE UNIQUE INDEX IF NOT EXISTS customers_tenant_email_key ON customers (tenant_id, email);
"""


def _prepare_schema(db: TenantDb) -> None:
    role = sql.Identifier(BYPASS_ROLE)
    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        conn.execute(_CORPUS_COLUMNS)
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (BYPASS_ROLE,))
        verb = "ALTER" if exists.fetchone() else "CREATE"
        conn.execute(
            sql.SQL(
                verb + " ROLE {} LOGIN PASSWORD {} NOSUPERUSER BYPASSRLS NOCREATEDB "
                "NOCREATEROLE NOINHERIT"
            ).format(role, sql.Literal(BYPASS_PASSWORD))
        )
        conn.execute(sql.SQL("GRANT USAGE ON SCHEMA public, billing TO {}").format(role))
        conn.execute(
            sql.SQL(
                "GRANT SELECT, INSERT, UPDATE, DELETE ON orders, customers, billing.invoices TO {}"
            ).format(role)
        )
        conn.execute(
            sql.SQL(
                "GRANT USAGE ON SEQUENCE orders_id_seq, customers_id_seq, "
                "billing.invoices_id_seq TO {}"
            ).format(role)
        )
        conn.execute(sql.SQL("GRANT SELECT ON plans TO {}").format(role))


@pytest.fixture(scope="session")
def security_db(tenant_db: TenantDb) -> TenantDb:
    """The shared ``app`` database, extended to the corpus schema."""
    _prepare_schema(tenant_db)
    return tenant_db


@pytest.fixture(scope="module")
def proxy_both(security_db: TenantDb) -> Iterator[RunningProxy]:
    with RunningProxy(security_db.policy("both")) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def proxy_enforce(security_db: TenantDb) -> Iterator[RunningProxy]:
    """enforce mode, upstream role with BYPASSRLS: the analyser alone isolates tenants."""
    with RunningProxy(security_db.policy("enforce", **enforce_only_overrides())) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def proxy_rls(security_db: TenantDb) -> Iterator[RunningProxy]:
    with RunningProxy(security_db.policy("rls")) as proxy:
        yield proxy
