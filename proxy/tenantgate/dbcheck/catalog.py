"""A minimal catalog client for ``tenantgate check``: simple queries, text rows, no driver.

Owns :class:`CatalogClient` (the simple-query protocol over an authenticated
upstream connection, built on :mod:`tenantgate.upstream` and
:mod:`tenantgate.protocol`) and the helpers that put catalog values into SQL
text and messages safely (oids checked to be digits, names and literals quoted).
"""

from __future__ import annotations

import asyncio
import contextlib

from tenantgate.errors import RemoteProtocolError, UpstreamError
from tenantgate.protocol.backend import DataRow, ErrorResponse
from tenantgate.protocol.framing import MessageReader, frame
from tenantgate.protocol.frontend import Query
from tenantgate.rlssql import quote_ident
from tenantgate.upstream import UpstreamConnection

QUERY_TIMEOUT_S = 30.0
_READ = 64 * 1024


Row = tuple[str | None, ...]


class QueryFailed(UpstreamError):
    """A catalog query returned an ErrorResponse."""


class CatalogClient:
    """Simple-query protocol over an authenticated upstream connection; text results."""

    def __init__(self, conn: UpstreamConnection) -> None:
        self._conn = conn
        self._messages = MessageReader(max_size=64 * 1024 * 1024)

    async def rows(self, sql: str) -> list[Row]:
        try:
            return await asyncio.wait_for(self._rows(sql), QUERY_TIMEOUT_S)
        except TimeoutError:
            raise UpstreamError("timed out reading the catalogs") from None
        except (OSError, EOFError, RemoteProtocolError) as exc:
            raise UpstreamError(f"lost the connection while reading the catalogs: {exc}") from None

    async def _rows(self, sql: str) -> list[Row]:
        self._conn.writer.write(Query(sql).encode())
        await self._conn.writer.drain()
        out: list[Row] = []
        error: ErrorResponse | None = None
        while True:
            item = self._messages.next_message()
            if item is None:
                data = await self._conn.reader.read(_READ)
                if not data:
                    raise EOFError("server closed the connection")
                self._messages.feed(data)
                continue
            msg_type, payload = item
            if msg_type == ord("D"):
                values = DataRow.decode(payload).values
                out.append(tuple(None if v is None else v.decode("utf-8") for v in values))
            elif msg_type == ord("E"):
                error = ErrorResponse.decode(payload)
            elif msg_type == ord("Z"):
                if error is not None:
                    raise QueryFailed(
                        f"catalog query failed: {error.get('M')} (SQLSTATE {error.sqlstate})"
                    )
                return out
            # RowDescription, CommandComplete, EmptyQuery, Notice, ParameterStatus: not needed.

    async def value(self, sql: str) -> str | None:
        rows = await self.rows(sql)
        return rows[0][0] if rows else None

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            self._conn.writer.write(frame(b"X"))
        self._conn.close()


def checked_oid(value: str | None) -> str:
    """An oid read from the catalogs, checked before it is put into SQL text."""
    if value is None or not value.isdigit():
        raise UpstreamError(f"unexpected oid {value!r} from the catalogs")
    return value


def is_true(value: str | None) -> bool:
    return value == "t"


def relation_name(schema: str | None, name: str | None) -> str:
    """A relation name for messages and fix SQL (schema-qualified, quoted)."""
    return f"{quote_ident(schema or '')}.{quote_ident(name or '')}"
