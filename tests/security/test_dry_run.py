"""``dry_run: true``: statements that would be rejected are forwarded, not refused.

In ``both`` mode RLS still confines them to the session's tenant.  In enforce
mode against an upstream that bypasses RLS nothing confines them: that case is
also the positive control of this suite's leak detector (it must see globex).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from security_support import OTHER_TENANTS, TENANT, LibpqClient, enforce_only_overrides, leaks

from support.db import ORDERS_PER_TENANT, TENANTS, TenantDb
from support.proxy import RunningProxy

pytestmark = [pytest.mark.security]

ALL_ORDERS = "SELECT id, tenant_id, secret FROM orders ORDER BY id"


@pytest.fixture(scope="module")
def dry_both(security_db: TenantDb) -> Iterator[RunningProxy]:
    with RunningProxy(security_db.policy("both", dry_run=True)) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def dry_enforce(security_db: TenantDb) -> Iterator[RunningProxy]:
    policy = security_db.policy("enforce", dry_run=True, **enforce_only_overrides())
    with RunningProxy(policy) as proxy:
        yield proxy


def _client(proxy: RunningProxy, db: TenantDb) -> LibpqClient:
    user = db.user(TENANT)
    return LibpqClient(proxy.dsn(user.name, user.password))


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_dry_run_both_forwards_and_rls_confines(
    dry_both: RunningProxy, clean_tenant_db: TenantDb, protocol: str
) -> None:
    before = {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS}
    with _client(dry_both, clean_tenant_db) as client:
        out = client.run(ALL_ORDERS, None, protocol)
        assert out.error is None, out.error
        assert len(out.rows) == ORDERS_PER_TENANT
        assert {row[1] for row in out.rows} == {TENANT}
        out = client.run(
            "UPDATE orders SET item = 'dry' WHERE tenant_id = 'globex'", None, protocol
        )
        assert out.error is None, out.error
        assert "UPDATE 0" in out.texts
        assert not leaks("\n".join(out.texts), "globex")
        if protocol == "extended":
            out = client.extended(
                "SELECT id, tenant_id FROM orders WHERE tenant_id = $1", ["globex"]
            )
            assert out.error is None, out.error
            assert out.rows == []
        assert client.usable()
    assert {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS} == before


def test_dry_run_enforce_forwards_unconfined(
    dry_enforce: RunningProxy, security_db: TenantDb
) -> None:
    """Control: with no RLS behind it, a dry run hands out every tenant's rows, and the
    leak detector used by the rest of this suite notices."""
    with _client(dry_enforce, security_db) as client:
        out = client.simple(ALL_ORDERS)
        assert out.error is None, out.error
        assert {row[1] for row in out.rows} == set(TENANTS)
        assert set(leaks("\n".join(out.texts), ALL_ORDERS)) >= {"globex-secret", "initech"}


def test_enforce_without_dry_run_refuses_the_same(
    proxy_enforce: RunningProxy, security_db: TenantDb
) -> None:
    with _client(proxy_enforce, security_db) as client:
        out = client.simple(ALL_ORDERS)
        assert out.rejected, out.error
        assert out.rows == []
        assert client.usable()


def test_dry_run_both_wrong_tenant_literal_simple(
    dry_both: RunningProxy, clean_tenant_db: TenantDb
) -> None:
    """A would-be wrong_tenant rejection (analysis complete) over the simple protocol:
    forwarded with the injected tenant, so RLS returns nothing of globex."""
    before = {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS}
    with _client(dry_both, clean_tenant_db) as client:
        out = client.simple("SELECT id, tenant_id, secret FROM orders WHERE tenant_id = 'globex'")
        assert out.error is None, out.error
        assert out.rows == []
        out = client.simple(
            "SELECT id, tenant_id FROM orders WHERE tenant_id = 'acme'; "
            "DELETE FROM orders WHERE tenant_id = 'initech'"
        )
        assert out.error is None, out.error
        assert len(out.rows) == ORDERS_PER_TENANT
        assert "DELETE 0" in out.texts
        assert client.usable()
    assert {t: clean_tenant_db.snapshot(t) for t in OTHER_TENANTS} == before
