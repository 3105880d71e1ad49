"""The processes a benchmark run needs: PostgreSQL, PgBouncer and tenantgate.

Everything is started on 127.0.0.1 only, registered with a
:class:`contextlib.ExitStack` by the caller, and stopped (then its files
removed) when the stack unwinds: normal end, an exception, Ctrl-C or SIGTERM
(``run.py`` turns SIGTERM into KeyboardInterrupt).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

import yaml

from tenantgate.auth import make_verifier
from tenantgate.cluster import TemporaryCluster
from tenantgate.config import Policy, parse_policy
from tenantgate.rlssql import generate_rls_sql, quote_ident, quote_literal

HOST = "127.0.0.1"
DATABASE = "bench"
APP_ROLE = "bench_app"  # under the fail-closed RLS policies (rls / both modes)
ENFORCE_ROLE = "bench_enforce"  # not restricted by RLS: isolation is the proxy's check
OWNER_ROLE = "bench_owner"
TENANTS: tuple[str, ...] = ("acme", "globex", "initech", "umbrella")
BENCH_TENANT = "acme"
TABLES: dict[str, str] = {
    "pgbench_accounts": "tenant_id",
    "pgbench_branches": "tenant_id",
    "pgbench_tellers": "tenant_id",
    "pgbench_history": "tenant_id",
}
VENV_BIN = Path(sys.executable).parent


@dataclass(frozen=True)
class Scale:
    """Rows per tenant."""

    accounts: int = 100_000
    branches: int = 16
    tellers: int = 160


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    """Wait until ``port`` accepts TCP connections; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before listening")
        try:
            with socket.create_connection((HOST, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {HOST}:{port} within {timeout:g}s")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_command(main: Callable[[], int]) -> NoReturn:
    """Run a benchmark command's ``main`` and exit with its status.

    SIGTERM acts as Ctrl-C, so the ExitStack ``main`` holds stops everything it
    started either way; an interrupted run exits 130.
    """
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        status = main()
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        status = 130
    sys.exit(status)


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10
) -> None:
    """Signal a process started with ``start_new_session``; SIGKILL its group if it lingers."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything the process left in its group


def raise_nofile() -> int:
    """Raise this process's open-file limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def stat_fields(pid: int | str) -> list[str]:
    """``/proc/<pid>/stat`` after the command name: [1] ppid, [11:15] utime stime cutime
    cstime (clock ticks)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def process_cpu(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pid``."""
    fields = stat_fields(pid)
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / ticks, int(fields[12]) / ticks


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of ``pid`` in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


# --- PostgreSQL ---------------------------------------------------------------------


class Database:
    """A throwaway cluster holding the multi-tenant pgbench schema."""

    def __init__(self, scale: Scale, max_connections: int) -> None:
        self.scale = scale
        self.app_password = secrets.token_urlsafe(18)
        self.enforce_password = secrets.token_urlsafe(18)
        self.cluster = TemporaryCluster(
            preference="system",
            settings={
                "max_connections": max_connections,
                "shared_buffers": "128MB",
                "max_locks_per_transaction": 16,
                "work_mem": "1MB",
                "autovacuum": False,
                "log_min_messages": "warning",
                "log_connections": False,
            },
        )

    def start(self) -> None:
        self.cluster.start()
        self._load()

    def stop(self) -> None:
        self.cluster.stop()

    @property
    def port(self) -> int:
        return self.cluster.port

    @property
    def version(self) -> str:
        return self.cluster.psql("SHOW server_version").strip()

    def password_of(self, role: str) -> str:
        return self.app_password if role == APP_ROLE else self.enforce_password

    def _load(self) -> None:
        c = self.cluster
        c.psql(
            f"CREATE ROLE {OWNER_ROLE} NOLOGIN;\n"
            f"CREATE ROLE {APP_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
            f"PASSWORD {quote_literal(self.app_password)};\n"
            f"CREATE ROLE {ENFORCE_ROLE} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE "
            f"PASSWORD {quote_literal(self.enforce_password)};\n"
            f"CREATE DATABASE {DATABASE} OWNER {OWNER_ROLE};\n"
        )
        s = self.scale
        tenants = "ARRAY[" + ", ".join(quote_literal(t) for t in TENANTS) + "]"
        c.psql(
            f"""
SET ROLE {OWNER_ROLE};
CREATE TABLE pgbench_branches (tenant_id text NOT NULL, bid int NOT NULL,
    bbalance int NOT NULL, filler char(88), PRIMARY KEY (tenant_id, bid));
CREATE TABLE pgbench_tellers (tenant_id text NOT NULL, tid int NOT NULL, bid int NOT NULL,
    tbalance int NOT NULL, filler char(84), PRIMARY KEY (tenant_id, tid));
CREATE TABLE pgbench_accounts (tenant_id text NOT NULL, aid int NOT NULL, bid int NOT NULL,
    abalance int NOT NULL, filler char(84), PRIMARY KEY (tenant_id, aid));
CREATE TABLE pgbench_history (tenant_id text NOT NULL, tid int, bid int, aid int, delta int,
    mtime timestamp, filler char(22));
INSERT INTO pgbench_branches SELECT t, b, 0, '' FROM unnest({tenants}) t,
    generate_series(1, {s.branches}) b;
INSERT INTO pgbench_tellers SELECT t, g, (g - 1) % {s.branches} + 1, 0, ''
    FROM unnest({tenants}) t, generate_series(1, {s.tellers}) g;
INSERT INTO pgbench_accounts SELECT t, g, (g - 1) % {s.branches} + 1, 0, ''
    FROM unnest({tenants}) t, generate_series(1, {s.accounts}) g;
GRANT SELECT, INSERT, UPDATE ON pgbench_branches, pgbench_tellers, pgbench_accounts,
    pgbench_history TO {APP_ROLE}, {ENFORCE_ROLE};
RESET ROLE;
""",
            database=DATABASE,
            timeout=600,
        )
        # Fail-closed RLS for bench_app, exactly as `tenantgate rls-sql` makes it.
        c.psql(generate_rls_sql(self.policy_for(APP_ROLE), tenant_role=APP_ROLE), DATABASE)
        # bench_enforce models an enforce-only deployment: RLS does not restrict it
        # (the restrictive guard applies TO bench_app only), the proxy's check does.
        c.psql(
            "".join(
                f"CREATE POLICY bench_enforce_all ON {quote_ident(t)} AS PERMISSIVE FOR ALL "
                f"TO {ENFORCE_ROLE} USING (true) WITH CHECK (true);\n"
                for t in TABLES
            ),
            DATABASE,
        )
        c.psql("VACUUM ANALYZE", DATABASE, timeout=600)

    def policy_for(self, role: str) -> Policy:
        """A minimal Policy (only what rlssql needs) naming ``role`` upstream."""
        return Policy.model_validate(
            {
                "upstream": {"database": DATABASE, "user": role},
                "tables": TABLES,
                "tenants": {t: {"users": {f"{t}_app": {"password": "x"}}} for t in TENANTS},
            }
        )


# --- PgBouncer ------------------------------------------------------------------------


def ensure_pgbouncer() -> str:
    found = shutil.which("pgbouncer") or (
        "/usr/sbin/pgbouncer" if os.access("/usr/sbin/pgbouncer", os.X_OK) else None
    )
    if found:
        return found
    print("pgbouncer not found: apt-get install -y pgbouncer", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    done = subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "pgbouncer"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, check=False)
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "pgbouncer"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    # The package starts a system service on the default port; we do not use it.
    subprocess.run(["service", "pgbouncer", "stop"], capture_output=True, check=False, timeout=30)
    found = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    if not os.access(found, os.X_OK):
        raise RuntimeError("pgbouncer is still missing after apt-get install")
    return found


def tool_version(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except OSError as exc:
        return f"unknown ({exc})"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else ""


class PgBouncer:
    """PgBouncer in session pooling mode in front of the benchmark database."""

    def __init__(self, workdir: Path, db: Database, max_clients: int = 1000) -> None:
        self.binary = ensure_pgbouncer()
        self.dir = workdir / "pgbouncer"
        self.db = db
        self.max_clients = max_clients
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def version(self) -> str:
        return tool_version([self.binary, "--version"])

    def start(self) -> None:
        self.dir.mkdir(mode=0o700)
        user = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
        self.port = free_port()
        roles = (APP_ROLE, ENFORCE_ROLE)
        auth = "".join(f'"{r}" "{self.db.password_of(r)}"\n' for r in roles)
        (self.dir / "userlist.txt").write_text(auth)
        (self.dir / "pgbouncer.ini").write_text(
            f"""[databases]
{DATABASE} = host={HOST} port={self.db.port} dbname={DATABASE}

[pgbouncer]
listen_addr = {HOST}
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.dir / "userlist.txt"}
pool_mode = session
max_client_conn = {self.max_clients}
default_pool_size = {self.max_clients}
max_db_connections = 0
ignore_startup_parameters = extra_float_digits
server_tls_sslmode = disable
client_tls_sslmode = disable
log_connections = 0
log_disconnections = 0
log_pooler_errors = 1
stats_period = 3600
logfile = {self.dir / "pgbouncer.log"}
pidfile = {self.dir / "pgbouncer.pid"}
"""
        )
        for path in (self.dir, *self.dir.iterdir()):
            if user is not None:
                os.chown(path, user.pw_uid, user.pw_gid)
            path.chmod(0o700 if path.is_dir() else 0o600)
        self.proc = subprocess.Popen(
            [self.binary, str(self.dir / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir.parent / "pgbouncer.stderr", "wb"),  # noqa: SIM115
            start_new_session=True,
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
        wait_port(self.port, self.proc, "pgbouncer")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM)
            self.proc = None

    def log_tail(self) -> str:
        try:
            return "\n".join((self.dir / "pgbouncer.log").read_text().splitlines()[-20:])
        except OSError:
            return ""


# --- tenantgate ------------------------------------------------------------------------


class Forwarder:
    """``forwarder.py``: the cheapest Python proxy (uvloop, parses nothing), the floor
    any Python proxy pays on this machine."""

    def __init__(self, workdir: Path, db: Database) -> None:
        self.workdir, self.db, self.port = workdir, db, 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("forwarder.py")), str(self.port),
             str(self.db.port)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "forwarder.log", "ab"),  # noqa: SIM115
            start_new_session=True,
        )  # fmt: skip
        wait_port(self.port, self.proc, "forwarder")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None


class Tenantgate:
    """``tenantgate serve`` as a subprocess in one mode, with one login per tenant."""

    def __init__(
        self, workdir: Path, db: Database, mode: str, name: str | None = None, pure: bool = False
    ) -> None:
        self.workdir = workdir
        self.db = db
        self.mode = mode
        self.pure = pure  # ignore the compiled modules (TENANTGATE_PURE_PYTHON=1)
        self.name = name or f"tenantgate-{mode}{'-pure' if pure else ''}"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.passwords = {t: secrets.token_urlsafe(12) for t in TENANTS}
        self.upstream_role = ENFORCE_ROLE if mode == "enforce" else APP_ROLE
        # What runs it, and what its environment adds (lane_prototype/ab.py swaps these).
        self.launcher: tuple[str, ...] = (str(VENV_BIN / "tenantgate"),)
        self.extra_env: dict[str, str] = {}

    @staticmethod
    def user_of(tenant: str) -> str:
        return f"{tenant}_app"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def write_policy(self) -> Path:
        policy = {
            "listen": {"host": HOST, "port": self.port},
            "metrics": {"enabled": False, "host": HOST, "port": 0},
            "upstream": {
                "host": HOST,
                "port": self.db.port,
                "database": DATABASE,
                "user": self.upstream_role,
                "password": self.db.password_of(self.upstream_role),
                "sslmode": "disable",
            },
            "mode": self.mode,
            "tables": TABLES,
            "tenants": {
                t: {"users": {self.user_of(t): {"password": make_verifier(pw).encode()}}}
                for t, pw in self.passwords.items()
            },
            "limits": {
                "max_client_connections": 20000,
                "handshake_timeout_s": 120,
                "shutdown_timeout_s": 1,
            },
            "logging": {"level": "warning"},
        }
        text = yaml.safe_dump(policy, sort_keys=False)
        parse_policy(text)  # fail here, not in the subprocess, on a policy error
        path = self.workdir / f"{self.name}.yaml"
        path.write_text(text)
        path.chmod(0o600)
        return path

    def start(self) -> None:
        self.port = free_port()
        config = self.write_policy()
        self.proc = subprocess.Popen(
            [
                *self.launcher,
                "--log-level",
                "warning",
                "serve",
                "--config",
                str(config),
            ],
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / f"{self.name}.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={
                **os.environ,
                "TENANTGATE_PURE_PYTHON": "1" if self.pure else "0",
                **self.extra_env,
            },
        )
        wait_port(self.port, self.proc, self.name)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM)
            self.proc = None

    def log_text(self) -> str:
        try:
            return (self.workdir / f"{self.name}.log").read_text(errors="replace")
        except OSError:
            return ""


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    match = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else "unknown"
