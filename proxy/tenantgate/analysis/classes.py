"""Statement-class allow-list: what kind of top-level statement is this, may it run?

Owns the mapping from a top-level parse node to (command, tag, transaction kind)
and the refusal of every class not on the allow-list.

Allowed: SELECT/VALUES/TABLE, INSERT, UPDATE, DELETE, transaction control
(BEGIN/START TRANSACTION, COMMIT/END, ROLLBACK/ABORT, SAVEPOINT, RELEASE,
ROLLBACK TO), SET/RESET of allow-listed settings and SET TRANSACTION /
SET SESSION CHARACTERISTICS (see :mod:`.settings`), SET CONSTRAINTS, SHOW,
EXPLAIN (inner statement analysed like itself; ANALYZE only when it writes
nothing), ``COPY (query) TO STDOUT``, DECLARE (not WITH HOLD; query analysed),
FETCH/MOVE/CLOSE.  ``COMMIT AND CHAIN`` / ``ROLLBACK AND CHAIN`` are reported
as ``commit``/``rollback``: a new transaction starts at once, so the proxy must
re-inject the tenant (rls mode) exactly as after any other COMMIT/ROLLBACK.
Everything else -- DDL, GRANT/REVOKE, PREPARE TRANSACTION, COMMIT PREPARED,
SQL PREPARE/EXECUTE/DEALLOCATE, DO, CALL, LISTEN/NOTIFY/UNLISTEN, LOCK,
TRUNCATE, VACUUM/ANALYZE, DISCARD, COPY of tables/files/programs/FROM, ALTER
SYSTEM, LOAD, CHECKPOINT, MERGE, SELECT INTO -- is ``statement_class``.
"""

from __future__ import annotations

from typing import Any

from .model import Command, Rejected, TransactionKind
from .settings import check_set
from .walker import Walker

Node = dict[str, Any]

_TRANSACTION: dict[str, tuple[str, TransactionKind]] = {
    "TRANS_STMT_BEGIN": ("BEGIN", "begin"),
    "TRANS_STMT_START": ("START TRANSACTION", "begin"),
    "TRANS_STMT_COMMIT": ("COMMIT", "commit"),
    "TRANS_STMT_ROLLBACK": ("ROLLBACK", "rollback"),
    "TRANS_STMT_SAVEPOINT": ("SAVEPOINT", "savepoint"),
    "TRANS_STMT_RELEASE": ("RELEASE", "release"),
    "TRANS_STMT_ROLLBACK_TO": ("ROLLBACK", "rollback_to"),
}

_DML: dict[str, tuple[Command, str]] = {
    "SelectStmt": ("select", "SELECT"),
    "InsertStmt": ("insert", "INSERT"),
    "UpdateStmt": ("update", "UPDATE"),
    "DeleteStmt": ("delete", "DELETE"),
}

_NAMES: dict[str, str] = {
    "GrantStmt": "GRANT/REVOKE",
    "GrantRoleStmt": "GRANT/REVOKE of a role",
    "DoStmt": "DO",
    "CallStmt": "CALL",
    "CreateFunctionStmt": "CREATE FUNCTION/PROCEDURE",
    "PrepareStmt": "PREPARE (SQL-level)",
    "ExecuteStmt": "EXECUTE (SQL-level)",
    "ListenStmt": "LISTEN",
    "NotifyStmt": "NOTIFY",
    "UnlistenStmt": "UNLISTEN",
    "LockStmt": "LOCK",
    "TruncateStmt": "TRUNCATE",
    "VacuumStmt": "VACUUM/ANALYZE",
    "DiscardStmt": "DISCARD",
    "AlterSystemStmt": "ALTER SYSTEM",
    "LoadStmt": "LOAD",
    "CheckPointStmt": "CHECKPOINT",
    "MergeStmt": "MERGE",
    "CreateStmt": "DDL (CREATE TABLE)",
    "CreateTableAsStmt": "DDL (CREATE TABLE AS)",
    "ViewStmt": "DDL (CREATE VIEW)",
    "IndexStmt": "DDL (CREATE INDEX)",
    "AlterTableStmt": "DDL (ALTER TABLE)",
    "DropStmt": "DDL (DROP)",
    "RenameStmt": "DDL (RENAME)",
    "AlterRoleSetStmt": "ALTER ROLE ... SET",
    "AlterDatabaseSetStmt": "ALTER DATABASE ... SET",
    "AlterRoleStmt": "ALTER ROLE",
    "CreateRoleStmt": "CREATE ROLE",
    "DropRoleStmt": "DROP ROLE",
    "ReindexStmt": "REINDEX",
    "ClusterStmt": "CLUSTER",
    "RefreshMatViewStmt": "REFRESH",
    "CommentStmt": "COMMENT",
    "CreateSchemaStmt": "DDL (CREATE SCHEMA)",
    "CreateTrigStmt": "DDL (CREATE TRIGGER)",
    "RuleStmt": "DDL (CREATE RULE)",
    "CreatePolicyStmt": "DDL (CREATE POLICY)",
    "AlterPolicyStmt": "DDL (ALTER POLICY)",
    "CreateExtensionStmt": "DDL (CREATE EXTENSION)",
    "CreateSeqStmt": "DDL (CREATE SEQUENCE)",
    "AlterSeqStmt": "DDL (ALTER SEQUENCE)",
    "AlterOwnerStmt": "DDL (ALTER ... OWNER)",
    "ReassignOwnedStmt": "REASSIGN OWNED",
    "DropOwnedStmt": "DROP OWNED",
    "SecLabelStmt": "SECURITY LABEL",
    "AlterDefaultPrivilegesStmt": "ALTER DEFAULT PRIVILEGES",
    "CreateEventTrigStmt": "DDL (CREATE EVENT TRIGGER)",
}

_CURSOR_OPT_HOLD = 0x20


def class_name(kind: str) -> str:
    """Human name of a refused statement class."""
    name = _NAMES.get(kind)
    if name is not None:
        return name
    base = kind[:-4] if kind.endswith("Stmt") else kind
    for prefix in ("Create", "Alter", "Drop", "Define", "Import", "Composite"):
        if base.startswith(prefix):
            return f"DDL ({base})"
    return base


def refuse(kind: str) -> Rejected:
    """The statement_class rejection for a node type."""
    return Rejected(
        "statement_class",
        f"{class_name(kind)} statements are not allowed",
        "tenants may run SELECT, INSERT, UPDATE, DELETE, transaction control, "
        "SHOW, harmless SET, EXPLAIN and COPY (query) TO STDOUT",
    )


class Classified:
    """Result of classifying one top-level statement."""

    __slots__ = ("command", "idle_timeout", "tag", "timeout", "transaction")

    def __init__(
        self,
        command: Command,
        tag: str,
        transaction: TransactionKind | None = None,
        timeout: int | None = None,
        idle_timeout: int | None = None,
    ) -> None:
        self.command = command
        self.tag = tag
        self.transaction = transaction
        self.timeout = timeout
        self.idle_timeout = idle_timeout


def classify(stmt: Node, walker: Walker) -> Classified:
    """Check one top-level statement (walking it); raises Rejected if refused."""
    kind, body = next(iter(stmt.items())) if stmt else ("", {})
    if kind in _DML:
        walker.walk(stmt, frozenset())
        command, tag = _DML[kind]
        return Classified(command, tag)
    if kind == "TransactionStmt":
        entry = _TRANSACTION.get(body.get("kind", ""))
        if entry is None:
            raise Rejected(
                "statement_class",
                "two-phase commit statements are not allowed",
                "use BEGIN/COMMIT/ROLLBACK",
            )
        return Classified("other", entry[0], entry[1])
    if kind == "DeallocateStmt":
        # Only protocol-level statements exist (SQL PREPARE is refused): the session's own.
        if body.get("isall"):
            return Classified("other", "DEALLOCATE ALL")
        if str(body.get("name", "")).startswith("__tenantgate"):
            raise Rejected(
                "reserved_name",
                "statement names starting with __tenantgate are reserved",
                "deallocate your own prepared statements only",
            )
        return Classified("other", "DEALLOCATE")
    if kind == "VariableSetStmt":
        tag, capped = check_set(body, walker.policy.tenant_setting)
        timeouts = dict([capped]) if capped else {}
        return Classified(
            "other",
            tag,
            _set_transaction_kind(body),
            timeouts.get("statement_timeout"),
            timeouts.get("idle_in_transaction_session_timeout"),
        )
    if kind == "VariableShowStmt":
        return Classified("other", "SHOW")
    if kind == "ConstraintsSetStmt":
        return Classified("other", "SET CONSTRAINTS")
    if kind == "ExplainStmt":
        return _explain(body, walker)
    if kind == "CopyStmt":
        return _copy(body, walker)
    if kind == "DeclareCursorStmt":
        if int(body.get("options", 0)) & _CURSOR_OPT_HOLD:
            raise Rejected(
                "statement_class",
                "DECLARE ... WITH HOLD is not allowed",
                "declare the cursor WITHOUT HOLD inside a transaction",
            )
        walker.walk(body.get("query"), frozenset())
        return Classified("other", "DECLARE CURSOR")
    if kind == "FetchStmt":
        return Classified("other", "MOVE" if body.get("ismove") else "FETCH")
    if kind == "ClosePortalStmt":
        return Classified("other", "CLOSE CURSOR" if body.get("portalname") else "CLOSE CURSOR ALL")
    raise refuse(kind)


def _explain(body: Node, walker: Walker) -> Classified:
    analyze = False
    for option in body.get("options", []):
        elem = option.get("DefElem", {})
        if elem.get("defname") == "analyze":
            arg = elem.get("arg")
            analyze = not _false(arg)
    query = body.get("query", {})
    inner = next(iter(query), "")
    if inner not in _DML:
        raise refuse(inner)
    walker.walk(query, frozenset())
    if analyze and walker.writes:
        raise Rejected(
            "statement_class",
            "EXPLAIN ANALYZE of a write is not allowed",
            "EXPLAIN ANALYZE executes the statement; use plain EXPLAIN",
        )
    return Classified("other", "EXPLAIN")


def _false(arg: Node | None) -> bool:
    if arg is None:
        return False
    if "String" in arg:
        return str(arg["String"].get("sval", "")).lower() in ("false", "off", "no", "0")
    if "Boolean" in arg:
        return not bool(arg["Boolean"].get("boolval", False))
    if "Integer" in arg:
        return bool(arg["Integer"].get("ival", 0) == 0)
    return False


def _copy(body: Node, walker: Walker) -> Classified:
    query = body.get("query")
    if (
        body.get("is_from")
        or body.get("is_program")
        or body.get("filename") is not None
        or query is None
    ):
        what = (
            "COPY FROM"
            if body.get("is_from")
            else "COPY to a file or program"
            if query is not None
            else "COPY of a table"
        )
        raise Rejected(
            "statement_class",
            f"{what} is not allowed",
            "use COPY (SELECT ... WHERE tenant_id = $1) TO STDOUT",
        )
    inner = next(iter(query), "")
    if inner not in _DML:
        raise refuse(inner)
    walker.walk(query, frozenset())
    if body.get("whereClause") is not None:
        walker.walk(body["whereClause"], frozenset())
    return Classified("other", "COPY")


_TRANSACTION_SETTINGS = frozenset(
    {"transaction_isolation", "transaction_read_only", "transaction_deferrable"}
)


def _set_transaction_kind(body: Node) -> TransactionKind | None:
    """``SET TRANSACTION ...`` (and its GUC forms) must precede any query of the
    transaction, so the proxy's rls injection must not go before it."""
    if body.get("kind") == "VAR_SET_MULTI" and body.get("name") == "TRANSACTION":
        return "set_transaction"
    if str(body.get("name", "")).lower() in _TRANSACTION_SETTINGS:
        return "set_transaction"
    return None
