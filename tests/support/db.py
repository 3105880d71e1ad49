"""The tenant test database (``app``) and policies that point at it.

Owns the schema every integration test shares: roles ``app_tenant`` (the
proxy's upstream role: NOSUPERUSER NOBYPASSRLS, owns nothing, member of
nothing) and ``app_owner`` (owns the tables); tenant-scoped tables ``orders``,
``customers``, ``billing.invoices`` and the shared table ``plans``; fail-closed
RLS from :func:`tenantgate.rlssql.generate_rls_sql`; deterministic seed rows for
the tenants ``acme``, ``globex`` and ``initech``; and a factory for policies
(``tenantgate.config.Policy``) whose upstream is this database.
"""

from __future__ import annotations

import base64
import copy
import secrets
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import psycopg
import yaml
from psycopg import sql
from scramp import ScramMechanism

from tenantgate.cluster import Cluster
from tenantgate.config import Policy, parse_policy
from tenantgate.rlssql import generate_rls_sql

DATABASE = "app"
APP_ROLE = "app_tenant"
OWNER_ROLE = "app_owner"
TENANTS: tuple[str, ...] = ("acme", "globex", "initech")
SCOPED_TABLES: dict[str, str] = {
    "orders": "tenant_id",
    "customers": "tenant_id",
    "billing.invoices": "tenant_id",
}
SHARED_TABLES: tuple[str, ...] = ("plans",)
ORDERS_PER_TENANT = 5
CUSTOMERS_PER_TENANT = 3
INVOICES_PER_TENANT = 2
PLANS: tuple[tuple[int, str, Decimal], ...] = (
    (1, "free", Decimal("0")),
    (2, "pro", Decimal("29.00")),
    (3, "enterprise", Decimal("299.00")),
)


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """A PostgreSQL-format SCRAM-SHA-256 verifier (what ``tenantgate hash-password`` prints)."""
    salt, stored_key, server_key, count = ScramMechanism().make_auth_info(
        password, iteration_count=iterations, salt=secrets.token_bytes(16)
    )

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${count}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


@dataclass(frozen=True)
class TenantUser:
    """A login of the proxy: ``password`` is what a client types."""

    name: str
    tenant: str
    password: str
    scram: bool = False  # the policy holds a SCRAM verifier instead of the plaintext

    def policy_entry(self, verifiers: Mapping[str, str]) -> dict[str, str]:
        return {"password": verifiers[self.name] if self.scram else self.password}


USERS: tuple[TenantUser, ...] = (
    TenantUser("acme_app", "acme", "acme-pw"),
    TenantUser("globex_app", "globex", "globex-pw"),
    TenantUser("initech_app", "initech", "initech-pw"),
    TenantUser("acme_scram", "acme", "acme-scram-pw", scram=True),
)


def _deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _qualified(name: str) -> sql.Composable:
    return sql.SQL(".").join(sql.Identifier(part) for part in name.split("."))


Snapshot = dict[str, list[tuple[Any, ...]]]


@dataclass
class TenantDb:
    """The ``app`` database of the test cluster and everything tests need to use it."""

    cluster: Cluster
    app_password: str
    owner_password: str
    database: str = DATABASE
    app_user: str = APP_ROLE
    owner_user: str = OWNER_ROLE
    tenants: tuple[str, ...] = TENANTS
    tables: dict[str, str] = field(default_factory=lambda: dict(SCOPED_TABLES))
    shared_tables: tuple[str, ...] = SHARED_TABLES
    users: dict[str, TenantUser] = field(default_factory=lambda: {u.name: u for u in USERS})
    verifiers: dict[str, str] = field(default_factory=dict)
    pg_stat_statements: bool = False

    def __post_init__(self) -> None:
        for user in self.users.values():
            if user.scram and user.name not in self.verifiers:
                self.verifiers[user.name] = scram_verifier(user.password)

    # --- connection strings
    @property
    def host(self) -> str:
        return self.cluster.host

    @property
    def port(self) -> int:
        return self.cluster.port

    @property
    def superuser_dsn(self) -> str:
        """Superuser on ``app`` (bypasses RLS)."""
        return self.cluster.make_dsn(database=self.database)

    @property
    def app_dsn(self) -> str:
        """``app_tenant`` on ``app``, directly (no proxy): RLS applies, no tenant set."""
        return self.cluster.make_dsn(self.database, self.app_user, self.app_password)

    @property
    def owner_dsn(self) -> str:
        """``app_owner`` (owns the tables; FORCE RLS applies to it, no policy: sees 0 rows)."""
        return self.cluster.make_dsn(self.database, self.owner_user, self.owner_password)

    def users_of(self, tenant: str) -> list[TenantUser]:
        return [u for u in self.users.values() if u.tenant == tenant]

    def user(self, tenant: str) -> TenantUser:
        """The plaintext-password login of ``tenant`` (``<tenant>_app``)."""
        return self.users[f"{tenant}_app"]

    # --- policies
    def policy_dict(
        self,
        mode: str = "both",
        port: int = 0,
        *,
        metrics_port: int | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        """A policy (as a dict) whose upstream is this database.

        ``overrides`` are deep-merged top-level keys, e.g.
        ``limits={"max_client_connections": 5}`` or
        ``tenants={"acme": {"limits": {"max_connections": 2}}}``.
        Metrics are disabled unless ``metrics_port`` is given (0 = any free port).
        """
        tenants: dict[str, Any] = {}
        for user in self.users.values():
            entry = tenants.setdefault(user.tenant, {"users": {}})
            entry["users"][user.name] = user.policy_entry(self.verifiers)
        base: dict[str, Any] = {
            "listen": {"host": "127.0.0.1", "port": port},
            "metrics": {
                "host": "127.0.0.1",
                "port": metrics_port or 0,
                "enabled": metrics_port is not None,
            },
            "upstream": {
                "host": self.host,
                "port": self.port,
                "database": self.database,
                "user": self.app_user,
                "password": self.app_password,
                "sslmode": "disable",
            },
            "tenant_setting": "app.tenant_id",
            "mode": mode,
            "tables": dict(self.tables),
            "shared_tables": list(self.shared_tables),
            "unknown_tables": "reject",
            "tenants": tenants,
        }
        return _deep_merge(base, overrides)

    def policy_yaml(
        self,
        mode: str = "both",
        port: int = 0,
        *,
        metrics_port: int | None = None,
        **overrides: Any,
    ) -> str:
        """:meth:`policy_dict` as YAML text (for a config file or ``parse_policy``)."""
        data = self.policy_dict(mode, port, metrics_port=metrics_port, **overrides)
        return yaml.safe_dump(data, sort_keys=False)

    def policy(
        self,
        mode: str = "both",
        port: int = 0,
        *,
        metrics_port: int | None = None,
        **overrides: Any,
    ) -> Policy:
        """:meth:`policy_dict` validated through ``tenantgate.config.parse_policy``."""
        text = self.policy_yaml(mode, port, metrics_port=metrics_port, **overrides)
        return parse_policy(text, "<tenant_db policy>", env={})

    # --- data
    @contextmanager
    def connect(self, dsn: str | None = None) -> Iterator[psycopg.Connection[tuple[Any, ...]]]:
        """An autocommit psycopg connection (default: superuser on ``app``)."""
        with psycopg.connect(dsn or self.superuser_dsn, autocommit=True) as conn:
            yield conn

    def snapshot(self, tenant: str) -> Snapshot:
        """Every row of ``tenant`` in every scoped table, ordered by id, read as superuser."""
        out: Snapshot = {}
        with self.connect() as conn:
            for table, column in self.tables.items():
                query = sql.SQL("SELECT * FROM {} WHERE {} = %s ORDER BY id").format(
                    _qualified(table), sql.Identifier(column)
                )
                out[table] = conn.execute(query, (tenant,)).fetchall()
        return out

    def snapshot_all(self) -> Snapshot:
        """Every row of every scoped and shared table, ordered by id, read as superuser."""
        out: Snapshot = {}
        with self.connect() as conn:
            for table in (*self.tables, *self.shared_tables):
                query = sql.SQL("SELECT * FROM {} ORDER BY id").format(_qualified(table))
                out[table] = conn.execute(query).fetchall()
        return out

    def reseed(self) -> None:
        """Put the seed rows back (same ids) after a test changed data."""
        with self.connect() as conn, conn.transaction():
            _seed(conn)


def _seed(conn: psycopg.Connection[tuple[Any, ...]]) -> None:
    conn.execute("TRUNCATE orders, customers, billing.invoices, plans RESTART IDENTITY")
    for n, tenant in enumerate(TENANTS, start=1):
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO orders (tenant_id, item, amount, secret) VALUES (%s, %s, %s, %s)",
                [
                    (tenant, f"{tenant}-item-{i}", Decimal(10 * i + n), f"{tenant}-secret-{i}")
                    for i in range(1, ORDERS_PER_TENANT + 1)
                ],
            )
            cur.executemany(
                "INSERT INTO customers (tenant_id, name, email) VALUES (%s, %s, %s)",
                [
                    (tenant, f"{tenant} customer {i}", f"c{i}@{tenant}.example")
                    for i in range(1, CUSTOMERS_PER_TENANT + 1)
                ],
            )
        order_ids = [
            row[0]
            for row in conn.execute(
                "SELECT id FROM orders WHERE tenant_id = %s ORDER BY id LIMIT %s",
                (tenant, INVOICES_PER_TENANT),
            )
        ]
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO billing.invoices (tenant_id, order_id, total) VALUES (%s, %s, %s)",
                [(tenant, oid, Decimal(100 * n + i)) for i, oid in enumerate(order_ids, 1)],
            )
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO plans (id, name, price) VALUES (%s, %s, %s)", PLANS)


_SCHEMA = """
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE ON SCHEMA public TO {app};
GRANT USAGE, CREATE ON SCHEMA public TO {owner};
CREATE SCHEMA billing AUTHORIZATION {owner};
GRANT USAGE ON SCHEMA billing TO {app};
SET ROLE {owner};
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    item text,
    amount numeric,
    secret text
);
CREATE INDEX orders_tenant_id_idx ON orders (tenant_id);
CREATE TABLE customers (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    name text,
    email text
);
CREATE INDEX customers_tenant_id_idx ON customers (tenant_id);
CREATE TABLE billing.invoices (
    id bigserial PRIMARY KEY,
    tenant_id text NOT NULL,
    order_id bigint,
    total numeric
);
CREATE INDEX invoices_tenant_id_idx ON billing.invoices (tenant_id);
CREATE TABLE plans (id int PRIMARY KEY, name text, price numeric);
RESET ROLE;
GRANT SELECT, INSERT, UPDATE, DELETE ON orders, customers, billing.invoices TO {app};
GRANT USAGE ON SEQUENCE orders_id_seq, customers_id_seq, billing.invoices_id_seq TO {app};
GRANT SELECT ON plans TO {app};
"""


def create_tenant_db(cluster: Cluster, database: str = DATABASE) -> TenantDb:
    """(Re)create ``database``, its roles, tables, RLS and seed rows in ``cluster``."""
    db = TenantDb(
        cluster=cluster,
        app_password="app-" + secrets.token_urlsafe(12),
        owner_password="owner-" + secrets.token_urlsafe(12),
        database=database,
    )
    app, owner = sql.Identifier(db.app_user), sql.Identifier(db.owner_user)
    with psycopg.connect(cluster.make_dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database))
        )
        for role in (app, owner):
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(role))
        conn.execute(
            sql.SQL(
                "CREATE ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOBYPASSRLS NOCREATEDB "
                "NOCREATEROLE NOINHERIT"
            ).format(app, sql.Literal(db.app_password))
        )
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} NOSUPERUSER NOBYPASSRLS").format(
                owner, sql.Literal(db.owner_password)
            )
        )
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
        preload = str(conn.execute("SHOW shared_preload_libraries").fetchone()[0])  # type: ignore[index]
    db.pg_stat_statements = "pg_stat_statements" in {p.strip() for p in preload.split(",")}

    with psycopg.connect(db.superuser_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL(_SCHEMA).format(app=app, owner=owner))
        conn.execute(generate_rls_sql(db.policy()).encode())
        with conn.transaction():
            _seed(conn)
        if db.pg_stat_statements:
            conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("ANALYZE")
    return db
