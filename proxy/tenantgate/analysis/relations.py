"""Table-name resolution: which relation a ``RangeVar`` names, and what it may do.

Owns the compiled form of the table part of an :class:`AnalysisPolicy` and the
catalog allow/deny lists.

Resolution rules (Postgres searches ``pg_catalog`` before the search_path, and
tenants can never change search_path, so these mirror the server):

* An unqualified name in :data:`CATALOG_READABLE` is the catalog relation, even
  if the policy has a table of that name (that is what Postgres does).
* An unqualified name equal to a policy key without schema (``orders``) is that
  table (``public.orders``).  **Fail closed:** an unqualified name equal to the
  *last component* of any scoped key (``invoices`` for ``billing.invoices``) is
  also treated as that scoped table (it needs a tenant predicate), because a
  search_path or a same-named table elsewhere could make it one.  Scoped wins
  over shared.  Shared tables match exactly only (``plans`` = ``public.plans``):
  a last-component match would let an unknown table be read as shared.
* ``public.x`` matches key ``x``; ``s.x`` matches key ``s.x``.  A database
  qualifier (``db.s.x``) is ignored (the server only accepts the current db).
* ``pg_catalog.x``: readable only if in :data:`CATALOG_READABLE`, anything else
  there is a ``catalog_view`` rejection.  ``information_schema.x``: readable.
* ``pg_temp``/``pg_temp_N``/``pg_toast*`` or any other ``pg_`` schema: rejected.
* A statistics/session view name (``pg_stat*`` or :data:`CATALOG_DENIED`) in
  *any* schema is refused (``pg_stat_statements`` usually lives in public).
* An unqualified ``pg_*`` name that is neither readable catalog nor in the
  policy is a ``catalog_view`` rejection regardless of ``unknown_tables``
  (statistics and session views are never "unknown tables").
* CTE names are resolved by the walker before calling this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from .model import AnalysisPolicy

Kind = Literal["scoped", "shared", "catalog", "unknown", "denied_catalog", "temp"]

#: pg_catalog tables and views drivers and tools read; all describe schema
#: objects, not other sessions, statistics or secrets.
CATALOG_READABLE: frozenset[str] = frozenset(
    {
        "pg_aggregate",
        "pg_am",
        "pg_amop",
        "pg_amproc",
        "pg_attrdef",
        "pg_attribute",
        "pg_auth_members",
        "pg_cast",
        "pg_class",
        "pg_collation",
        "pg_constraint",
        "pg_conversion",
        "pg_database",
        "pg_default_acl",
        "pg_depend",
        "pg_description",
        "pg_enum",
        "pg_event_trigger",
        "pg_extension",
        "pg_foreign_data_wrapper",
        "pg_foreign_server",
        "pg_foreign_table",
        "pg_index",
        "pg_inherits",
        "pg_init_privs",
        "pg_language",
        "pg_namespace",
        "pg_opclass",
        "pg_operator",
        "pg_opfamily",
        "pg_parameter_acl",
        "pg_partitioned_table",
        "pg_policy",
        "pg_proc",
        "pg_publication",
        "pg_publication_namespace",
        "pg_publication_rel",
        "pg_range",
        "pg_rewrite",
        "pg_sequence",
        "pg_shdepend",
        "pg_shdescription",
        "pg_tablespace",
        "pg_transform",
        "pg_trigger",
        "pg_ts_config",
        "pg_ts_config_map",
        "pg_ts_dict",
        "pg_ts_parser",
        "pg_ts_template",
        "pg_type",
        # views
        "pg_available_extensions",
        "pg_available_extension_versions",
        "pg_indexes",
        "pg_matviews",
        "pg_policies",
        "pg_roles",
        "pg_rules",
        "pg_settings",
        "pg_tables",
        "pg_timezone_abbrevs",
        "pg_timezone_names",
        "pg_user",
        "pg_views",
        "pg_group",
        "pg_publication_tables",
        "pg_seclabels",
        "pg_shseclabel",
        "pg_seclabel",
        "pg_wait_events",
    }
)

#: pg_catalog relations that show other sessions, statistics, secrets or data
#: not covered by RLS.  Anything ``pg_*`` outside CATALOG_READABLE is denied too;
#: this list only makes the message precise.
CATALOG_DENIED: frozenset[str] = frozenset(
    {
        "pg_locks",
        "pg_prepared_statements",
        "pg_cursors",
        "pg_prepared_xacts",
        "pg_backend_memory_contexts",
        "pg_shmem_allocations",
        "pg_file_settings",
        "pg_hba_file_rules",
        "pg_ident_file_mappings",
        "pg_authid",
        "pg_shadow",
        "pg_user_mapping",
        "pg_user_mappings",
        "pg_largeobject",
        "pg_largeobject_metadata",
        "pg_replication_slots",
        "pg_replication_origin",
        "pg_replication_origin_status",
        "pg_subscription",
        "pg_subscription_rel",
        "pg_sequences",
        "pg_db_role_setting",
        "pg_config",
        "pg_aios",
        "pg_shmem_allocations_numa",
        "pg_statistic",
        "pg_statistic_ext",
        "pg_statistic_ext_data",
        "pg_stats",
        "pg_stats_ext",
        "pg_stats_ext_exprs",
    }
)


@dataclass(frozen=True, slots=True)
class Resolved:
    """A relation after resolution: its kind, display name and tenant column."""

    kind: Kind
    name: str
    tenant_column: str = ""


class Resolver:
    """The table part of a policy compiled for fast lookups."""

    __slots__ = ("_scoped", "_scoped_last", "_shared", "unknown_allowed")

    def __init__(self, policy: AnalysisPolicy) -> None:
        self._scoped: dict[str, tuple[str, str]] = {}
        self._scoped_last: dict[str, tuple[str, str]] = {}
        for key, col in _items(policy.scoped_tables):
            full = _canonical(key)
            self._scoped[full] = (full, col.lower())
            last = full.rsplit(".", 1)[-1]
            self._scoped_last.setdefault(last, (full, col.lower()))
        self._shared: dict[str, str] = {}
        for key in policy.shared_tables:
            full = _canonical(key)
            self._shared[full] = full
        self.unknown_allowed = policy.unknown_tables == "allow"

    def resolve(self, schema: str | None, name: str) -> Resolved:
        """Resolve a (schema, relname) pair as the server would, failing closed."""
        if schema is None:
            if name in CATALOG_READABLE:
                return Resolved("catalog", "pg_catalog." + name)
            hit = self._scoped.get("public." + name) or self._scoped_last.get(name)
            if hit is not None:
                return Resolved("scoped", hit[0], hit[1])
            shared = self._shared.get("public." + name)
            if shared is not None:
                return Resolved("shared", shared)
            if name.startswith("pg_"):
                return Resolved("denied_catalog", name)
            return Resolved("unknown", name)
        if schema == "pg_catalog":
            if name in CATALOG_READABLE:
                return Resolved("catalog", "pg_catalog." + name)
            return Resolved("denied_catalog", "pg_catalog." + name)
        if schema == "information_schema":
            return Resolved("catalog", "information_schema." + name)
        if schema.startswith("pg_temp"):
            return Resolved("temp", schema + "." + name)
        if schema.startswith("pg_"):
            return Resolved("denied_catalog", schema + "." + name)
        full = schema + "." + name
        if name in CATALOG_DENIED or name.startswith("pg_stat"):
            return Resolved("denied_catalog", full)  # e.g. public.pg_stat_statements
        hit = self._scoped.get(full)
        if hit is not None:
            return Resolved("scoped", hit[0], hit[1])
        shared = self._shared.get(full)
        if shared is not None:
            return Resolved("shared", shared)
        return Resolved("unknown", full)


def _canonical(key: str) -> str:
    key = key.strip().lower()
    return key if "." in key else "public." + key


def _items(mapping: Mapping[str, str]) -> list[tuple[str, str]]:
    return sorted(mapping.items())


def display(resolved: Resolved) -> str:
    """The name to show in messages (``public.`` dropped)."""
    name = resolved.name
    return name[7:] if name.startswith("public.") else name
