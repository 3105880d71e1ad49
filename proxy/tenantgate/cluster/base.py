"""The interface every cluster offers, and a server someone else runs.

Owns :class:`Cluster` (where a server listens, its superuser, DSNs in libpq
spelling, and a ``psql`` helper that runs SQL as the superuser through the psql
binary, so the package needs no database driver) and :class:`ExistingCluster`
(a superuser ``postgresql://`` URL, e.g. ``TENANTGATE_TEST_DSN``: nothing is
started or stopped).
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from tenantgate.cluster.binaries import find_psql
from tenantgate.errors import ClusterError


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
            self._psql = find_psql(None)
        return self._psql

    def __repr__(self) -> str:
        return f"ExistingCluster({_redact(self.dsn)!r})"


def _redact(dsn: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", dsn)
