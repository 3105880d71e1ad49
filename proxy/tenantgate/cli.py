"""The ``tenantgate`` command line: argument parsing and exit codes only.

Exit codes (contract): 0 ok, 1 check/verdict failed, 2 usage or config error.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from tenantgate import __version__
from tenantgate.errors import ConfigError

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tenantgate",
        description=(
            "Fail-closed tenant isolation for PostgreSQL. Point your application's "
            "connection string at tenantgate; it logs clients in as tenant users, "
            "checks every statement, and sets the tenant for row-level security."
        ),
    )
    parser.add_argument("--version", action="version", version=f"tenantgate {__version__}")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=None)
    parser.add_argument("--log-format", choices=["text", "json"], default=None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the proxy (SIGHUP reloads, SIGTERM drains)")
    serve.add_argument("--config", required=True, type=Path, help="policy file (YAML)")
    serve.add_argument(
        "--skip-check",
        action="store_true",
        help="start even if the database isolation check fails (emergencies only; logged loudly)",
    )

    hash_pw = commands.add_parser(
        "hash-password", help="print a SCRAM-SHA-256 verifier for a tenant user's password"
    )
    hash_pw.add_argument("password", nargs="?", help="the password (read from stdin if omitted)")

    explain = commands.add_parser("explain", help="show the verdict for one SQL string")
    explain.add_argument("--config", required=True, type=Path)
    explain.add_argument("--tenant", required=True, help="tenant id to evaluate as")
    explain.add_argument("sql", help="the SQL text")

    rls = commands.add_parser("rls-sql", help="print fail-closed row-level security DDL")
    rls.add_argument("--config", required=True, type=Path)

    check = commands.add_parser("check", help="validate the config and audit the database")
    check.add_argument("--config", required=True, type=Path)

    demo = commands.add_parser("demo", help="embedded PostgreSQL + demo schema + proxy")
    from tenantgate.demo import configure_parser  # noqa: PLC0415 - no heavy imports inside

    configure_parser(demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"tenantgate: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _dispatch(args: argparse.Namespace) -> int:
    from tenantgate.logs import setup_logging  # noqa: PLC0415 - keep --help fast

    if args.command == "hash-password":
        return _hash_password(args.password)
    if args.command == "serve":
        from tenantgate.app import serve  # noqa: PLC0415
        from tenantgate.config import load_policy  # noqa: PLC0415

        policy = load_policy(args.config)
        setup_logging(
            args.log_level or policy.logging.level, args.log_format or policy.logging.format
        )
        if policy.injects_tenant and not _startup_check(policy, args.skip_check):
            return EXIT_FAILED
        return _run(serve(args.config))
    if args.command == "check":
        return _check(args.config)
    if args.command == "explain":
        from tenantgate.explain import explain  # noqa: PLC0415

        result: int = explain(args.config, args.tenant, args.sql)
        return result
    if args.command == "rls-sql":
        from tenantgate.config import load_policy  # noqa: PLC0415
        from tenantgate.rlssql import generate_rls_sql  # noqa: PLC0415

        print(generate_rls_sql(load_policy(args.config)))
        return EXIT_OK
    if args.command == "demo":
        from tenantgate.demo import run_demo  # noqa: PLC0415

        setup_logging(args.log_level or "warning", args.log_format or "text")
        return run_demo(args)
    print(f"tenantgate: {args.command} is not available yet", file=sys.stderr)
    return EXIT_USAGE


def _run(coro: Coroutine[Any, Any, int]) -> int:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    try:
        import uvloop  # noqa: PLC0415

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is a dependency where available
        pass
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def _check(config: Path) -> int:
    from tenantgate.config import load_policy  # noqa: PLC0415
    from tenantgate.dbcheck import check_exit_code, format_findings, run_check  # noqa: PLC0415
    from tenantgate.errors import UpstreamError  # noqa: PLC0415

    policy = load_policy(config)
    try:
        findings = run_check(policy)
    except UpstreamError as exc:
        print(f"tenantgate: cannot check the database: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(format_findings(findings))
    return check_exit_code(findings)


def _startup_check(policy: Any, skip: bool) -> bool:
    """rls/both mode relies on the database's RLS setup: refuse to serve when it is unsound."""
    import logging  # noqa: PLC0415

    from tenantgate.dbcheck import check_exit_code, format_findings, run_check  # noqa: PLC0415
    from tenantgate.errors import UpstreamError  # noqa: PLC0415

    log = logging.getLogger("tenantgate")
    try:
        findings = run_check(policy)
    except UpstreamError as exc:
        # The proxy fails closed per connection (FATAL 08006) while the database is down.
        log.warning("could not check the database's isolation setup at startup: %s", exc)
        return True
    if check_exit_code(findings) == EXIT_OK:
        return True
    report = format_findings(findings)
    if skip:
        log.error(
            "STARTING ANYWAY (--skip-check): the database's isolation setup is NOT sound:\n%s",
            report,
        )
        return True
    log.error(
        "refusing to start in %s mode: the database's isolation setup is not sound "
        "(fix it, or start with --skip-check in an emergency):\n%s",
        policy.mode,
        report,
    )
    return False


def _hash_password(password: str | None) -> int:
    from tenantgate.auth import make_verifier  # noqa: PLC0415

    if password is None:
        password = getpass.getpass("Password: ") if sys.stdin.isatty() else sys.stdin.readline()
        password = password.rstrip("\n")
    if not password:
        print("tenantgate: empty password", file=sys.stderr)
        return EXIT_USAGE
    print(make_verifier(password).encode())
    return EXIT_OK
