"""A throwaway PostgreSQL cluster: initdb on a free port, started, stopped, removed.

Owns :class:`TemporaryCluster` (fast-but-unsafe settings, started with
``pg_ctl -w``, its files removed by :meth:`~TemporaryCluster.stop`).  When run
as root, the server runs as the ``postgres`` OS user (or a ``tenantgate-pg``
system user created on demand), because PostgreSQL refuses to run as root.
Every started cluster is also stopped at interpreter exit, so a crashed test
run does not leave a postmaster behind.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from tenantgate.cluster.base import Cluster
from tenantgate.cluster.binaries import find_postgres_bin, find_psql, has_server_binaries
from tenantgate.errors import ClusterError

log = logging.getLogger(__name__)
FALLBACK_OS_USER = "tenantgate-pg"


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
        if not has_server_binaries(self.bin_dir):
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
        return find_psql(self.bin_dir)

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
