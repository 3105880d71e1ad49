"""The metrics HTTP endpoints: ``/metrics``, ``/healthz`` and ``/readyz``.

Owns the small asyncio HTTP/1.0-style server the proxy runs next to the
listener: one request per connection, a bounded request head, timeouts, a
connection cap, and the exposition rendered off the event loop
(:meth:`tenantgate.metrics.Metrics.render_async`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Final

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from tenantgate.metrics import Metrics

log = logging.getLogger("tenantgate.metrics")

MAX_REQUEST_HEAD: Final = 8192
REQUEST_TIMEOUT_S: Final = 5.0
READY_TIMEOUT_S: Final = 2.0
MAX_HTTP_CONNECTIONS: Final = 32
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_TEXT: Final = "text/plain; charset=utf-8"


class MetricsServer:
    """A running metrics endpoint; :meth:`close` stops it."""

    def __init__(self, server: asyncio.Server) -> None:
        self._server = server
        sockets = server.sockets
        self.port: int = int(sockets[0].getsockname()[1]) if sockets else 0

    async def close(self) -> None:
        self._server.close()
        await self._server.wait_closed()


async def start_http(
    host: str, port: int, metrics: Metrics, ready: Callable[[], Awaitable[bool]]
) -> MetricsServer:
    """Serve ``GET /metrics``, ``/healthz`` and ``/readyz`` on ``host:port`` (0: any port).

    A deliberately tiny HTTP/1.1 server: one request per connection (``Connection:
    close``), the request head capped at 8 KiB and 5 s, at most 32 connections at
    a time; request bodies are ignored.
    ``/readyz`` is 200 only when ``await ready()`` returns True within 2 s.
    """

    active = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal active
        if active >= MAX_HTTP_CONNECTIONS:  # scrapers are few; refuse a flood outright
            writer.close()
            return
        active += 1
        try:
            status, content_type, body, head_only = await _respond(reader, metrics, ready)
            reason = _REASONS.get(status, "")
            headers = [
                f"HTTP/1.1 {status} {reason}",
                f"Content-Type: {content_type}",
                f"Content-Length: {len(body)}",
                "Connection: close",
            ]
            if status == 405:
                headers.append("Allow: GET, HEAD")
            writer.write(("\r\n".join(headers) + "\r\n\r\n").encode("ascii"))
            if not head_only:
                writer.write(body)
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await writer.drain()
        except (ConnectionError, TimeoutError):
            pass
        except Exception:  # the endpoint must never take the proxy down
            log.exception("metrics endpoint failed")
        finally:
            active -= 1
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port, limit=MAX_REQUEST_HEAD)
    return MetricsServer(server)


async def _respond(
    reader: asyncio.StreamReader, metrics: Metrics, ready: Callable[[], Awaitable[bool]]
) -> tuple[int, str, bytes, bool]:
    """(status, content type, body, head-only) for the request on ``reader``."""
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
    except TimeoutError:
        return 408, _TEXT, b"request timeout\n", False
    except asyncio.LimitOverrunError:
        return 431, _TEXT, b"request head too large\n", False
    except asyncio.IncompleteReadError:
        return 400, _TEXT, b"bad request\n", False
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return 400, _TEXT, b"bad request\n", False
    method, target, _version = parts
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        return 405, _TEXT, b"method not allowed\n", False
    head_only = method == "HEAD"
    if path == "/metrics":
        try:
            body = await metrics.render_async()
        except Exception:
            log.exception("rendering metrics failed")
            return 500, _TEXT, b"internal error\n", head_only
        return 200, CONTENT_TYPE_PLAIN_0_0_4, body, head_only
    if path == "/healthz":
        return 200, _TEXT, b"ok", head_only
    if path == "/readyz":
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                is_ready = await ready()
        except Exception:
            log.warning("readiness check failed", exc_info=True)
            is_ready = False
        if is_ready:
            return 200, _TEXT, b"ready", head_only
        return 503, _TEXT, b"not ready", head_only
    return 404, _TEXT, b"not found\n", head_only
