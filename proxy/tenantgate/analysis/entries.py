"""Range-table entries and the rejections that concern them.

Owns :class:`Entry` (one FROM item / DML target of a query level) and the
shared rejections for unreadable relations and missing proofs, so that the
walker and the write rules can both use them without importing each other.
"""

from __future__ import annotations

from .model import Rejected
from .relations import Resolved, Resolver, display


class Entry:
    """One range-table entry of a query level."""

    __slots__ = ("aliased", "hidden", "proven", "refname", "resolved", "schema")

    def __init__(
        self,
        refname: str | None,
        resolved: Resolved | None,
        schema: str | None = None,
        aliased: bool = False,
    ) -> None:
        self.refname = refname
        self.resolved = resolved
        self.schema = schema
        self.aliased = aliased
        self.hidden = False
        self.proven = False

    @property
    def scoped(self) -> bool:
        return self.resolved is not None and self.resolved.kind == "scoped"


def check_readable(resolved: Resolved, resolver: Resolver) -> None:
    """Refuse reads of denied catalog views, pg_temp, and unknown tables."""
    kind = resolved.kind
    if kind == "denied_catalog":
        raise Rejected(
            "catalog_view",
            f"reading {resolved.name} is not allowed",
            "statistics, session and security views can show other tenants' "
            "data; they are not available through tenantgate",
        )
    if kind == "temp":
        raise Rejected(
            "temp_schema",
            f"{resolved.name} (pg_temp) is not allowed",
            "temporary objects are not available through tenantgate",
        )
    if kind == "unknown" and not resolver.unknown_allowed:
        raise Rejected(
            "unknown_table",
            f"table {resolved.name} is not in the tenantgate policy",
            "add it to tables: (tenant-scoped) or shared_tables: in the config",
        )


def missing_predicate(entry: Entry) -> Rejected:
    """The rejection for a scoped entry without its proof."""
    assert entry.resolved is not None
    name = display(entry.resolved)
    col = entry.resolved.tenant_column
    ref = entry.refname or name
    return Rejected(
        "missing_tenant_predicate",
        f"{name} (as {ref}) has no tenant predicate at its query level",
        f"add WHERE {ref}.{col} = $1 (this tenant) as a top-level AND condition "
        "of the same query level (or the ON of an inner join)",
    )


def unsupported(what: str) -> Rejected:
    return Rejected(
        "unsupported_construct",
        f"{what} is not supported by tenantgate",
        "rewrite the statement with plain SELECT/INSERT/UPDATE/DELETE forms",
    )
