"""The proxy as a client of the upstream PostgreSQL server.

Owns opening the connection (TCP, optional TLS per ``sslmode``), the startup
packet the proxy builds itself, authentication as the configured role
(trust, cleartext, md5, SCRAM-SHA-256 via :mod:`scramp`), collecting
ParameterStatus/BackendKeyData until the first ReadyForQuery, verifying the
lexing pins, and sending CancelRequests.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from dataclasses import dataclass, field

from scramp import ScramClient, ScramException

from tenantgate.config import UpstreamConfig
from tenantgate.errors import UpstreamError
from tenantgate.protocol.backend import (
    AUTH_CLEARTEXT,
    AUTH_MD5,
    AUTH_OK,
    AUTH_SASL,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    Authentication,
    BackendKeyData,
    ErrorResponse,
    NegotiateProtocolVersion,
    ParameterStatus,
    ReadyForQuery,
    decode_backend,
)
from tenantgate.protocol.codec import cstring
from tenantgate.protocol.framing import MessageReader
from tenantgate.protocol.frontend import PasswordMessage, SASLInitialResponse
from tenantgate.protocol.startup import PROTOCOL_3_0, CancelRequest, SSLRequest, StartupMessage

# Settings whose values decide how the server lexes SQL: pinned for the whole
# session, so pglast and the server always read the same bytes the same way.
LEXING_PINS = {"client_encoding": "UTF8", "standard_conforming_strings": "on"}
READ_CHUNK = 256 * 1024


@dataclass(slots=True)
class UpstreamConnection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    parameters: dict[str, str] = field(default_factory=dict)
    parameter_order: list[str] = field(default_factory=list)
    process_id: int = 0
    secret_key: bytes = b""
    negotiated: NegotiateProtocolVersion | None = None

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


def _ssl_context(cfg: UpstreamConfig) -> ssl.SSLContext:
    if cfg.sslmode == "verify-full":
        ctx = ssl.create_default_context(cafile=str(cfg.sslrootcert) if cfg.sslrootcert else None)
        ctx.check_hostname = True
        ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # require/prefer: encryption without identity, as libpq
    return ctx


async def _open(cfg: UpstreamConfig) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(cfg.host, cfg.port, type=socket.SOCK_STREAM)
    last_error: OSError | None = None
    for family, socktype, proto, _name, address in infos:
        sock = socket.socket(family, socktype, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            last_error = exc
            continue
        try:
            return await _maybe_tls(cfg, sock)
        except BaseException:
            sock.close()
            raise
    raise last_error or OSError(f"no address for {cfg.host}")


async def _maybe_tls(
    cfg: UpstreamConfig, sock: socket.socket
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if cfg.sslmode == "disable":
        return await asyncio.open_connection(sock=sock, limit=READ_CHUNK)
    await loop.sock_sendall(sock, SSLRequest().encode())
    # Read exactly one byte so nothing unencrypted can be smuggled after it (CVE-2021-23222).
    answer = await loop.sock_recv(sock, 1)
    if answer == b"S":
        return await asyncio.open_connection(
            sock=sock,
            ssl=_ssl_context(cfg),
            # Always named: asyncio requires it with sock=; only verify-full checks it.
            server_hostname=cfg.host,
            limit=READ_CHUNK,
        )
    if answer == b"N" and cfg.sslmode == "prefer":
        return await asyncio.open_connection(sock=sock, limit=READ_CHUNK)
    if answer == b"N":
        raise UpstreamError(f"the server does not support TLS (sslmode={cfg.sslmode})")
    raise UpstreamError("unexpected answer to SSLRequest")


def startup_parameters(
    user: str, database: str, client_values: dict[str, str]
) -> tuple[tuple[str, str], ...]:
    """The startup packet the proxy sends: never the client's own packet."""
    params: list[tuple[str, str]] = [("user", user), ("database", database)]
    params.extend(client_values.items())
    params.extend(LEXING_PINS.items())
    return tuple(params)


async def connect(
    cfg: UpstreamConfig,
    client_values: dict[str, str] | None = None,
    user: str | None = None,
    password: str | None = None,
) -> UpstreamConnection:
    """Open, authenticate and wait for the first ReadyForQuery.

    Raises :class:`UpstreamError` with a message fit for a client's DETAIL.
    """
    role = user or cfg.user
    secret = password if user else cfg.password
    try:
        reader, writer = await asyncio.wait_for(_open(cfg), cfg.connect_timeout_s)
    except TimeoutError:
        raise UpstreamError(f"timed out connecting to {cfg.host}:{cfg.port}") from None
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise UpstreamError(f"connection to {cfg.host}:{cfg.port} failed: {exc}") from None
    conn = UpstreamConnection(reader, writer)
    try:
        params = startup_parameters(role, cfg.database, client_values or {})
        writer.write(StartupMessage(PROTOCOL_3_0, params).encode())
        await asyncio.wait_for(_handshake(conn, role, secret), cfg.connect_timeout_s)
    except TimeoutError:
        conn.close()
        raise UpstreamError("timed out authenticating to the upstream server") from None
    except (OSError, ssl.SSLError, EOFError) as exc:
        conn.close()
        raise UpstreamError(f"upstream connection failed during startup: {exc}") from None
    except BaseException:
        conn.close()
        raise
    for name, expected in LEXING_PINS.items():
        if conn.parameters.get(name) != expected:
            conn.close()
            raise UpstreamError(
                f"upstream {name} is {conn.parameters.get(name)!r}, expected {expected!r}"
            )
    return conn


async def _handshake(conn: UpstreamConnection, user: str, password: str | None) -> None:
    messages = MessageReader(max_size=1024 * 1024)
    scram: ScramClient | None = None
    while True:
        data = await conn.reader.read(READ_CHUNK)
        if not data:
            raise EOFError("server closed the connection")
        messages.feed(data)
        while (item := messages.next_message()) is not None:
            message = decode_backend(*item)
            if isinstance(message, ErrorResponse):
                reason = f"{message.get('M')} (SQLSTATE {message.sqlstate})"
                raise UpstreamError(f"upstream refused the connection: {reason}")
            if isinstance(message, Authentication):
                scram = await _authenticate(conn, message, user, password, scram)
            elif isinstance(message, ParameterStatus):
                if message.name not in conn.parameters:
                    conn.parameter_order.append(message.name)
                conn.parameters[message.name] = message.value
            elif isinstance(message, BackendKeyData):
                conn.process_id, conn.secret_key = message.process_id, message.secret_key
            elif isinstance(message, NegotiateProtocolVersion):
                conn.negotiated = message
            elif isinstance(message, ReadyForQuery):
                if messages.buffered:
                    raise UpstreamError("upstream sent data after its first ReadyForQuery")
                return
            # NoticeResponse during startup is dropped: it belongs to no client request.


async def _authenticate(
    conn: UpstreamConnection,
    message: Authentication,
    user: str,
    password: str | None,
    scram: ScramClient | None,
) -> ScramClient | None:
    code = message.code
    if code == AUTH_OK:
        return scram
    if password is None and code in (AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL):
        raise UpstreamError("upstream asked for a password but upstream.password is not set")
    assert password is not None or code not in (AUTH_CLEARTEXT, AUTH_MD5, AUTH_SASL)
    if code == AUTH_CLEARTEXT:
        conn.writer.write(PasswordMessage(cstring(password or "")).encode())
    elif code == AUTH_MD5:
        salt = message.data[:4]
        inner = hashlib.md5((password or "").encode() + user.encode()).hexdigest()  # noqa: S324 - protocol
        outer = hashlib.md5(inner.encode() + salt).hexdigest()  # noqa: S324
        conn.writer.write(PasswordMessage(cstring("md5" + outer)).encode())
    elif code == AUTH_SASL:
        mechanisms = message.sasl_mechanisms()
        if "SCRAM-SHA-256" not in mechanisms:
            raise UpstreamError(f"upstream offers no supported SASL mechanism: {mechanisms}")
        # Channel binding to the upstream is not implemented: gs2 'n', never 'y'.
        scram = ScramClient(["SCRAM-SHA-256"], user, password or "")
        first = scram.get_client_first().encode()
        conn.writer.write(SASLInitialResponse("SCRAM-SHA-256", first).encode())
    elif code == AUTH_SASL_CONTINUE and scram is not None:
        try:
            scram.set_server_first(message.data.decode())
        except ScramException as exc:
            raise UpstreamError(f"SCRAM with upstream failed: {exc}") from None
        conn.writer.write(PasswordMessage(scram.get_client_final().encode()).encode())
    elif code == AUTH_SASL_FINAL and scram is not None:
        try:
            scram.set_server_final(message.data.decode())
        except ScramException as exc:
            raise UpstreamError(f"upstream failed SCRAM server verification: {exc}") from None
    else:
        raise UpstreamError(f"unsupported upstream authentication request {code}")
    await conn.writer.drain()
    return scram


async def send_cancel(cfg: UpstreamConfig, process_id: int, secret_key: bytes) -> None:
    """Fire a CancelRequest at the upstream (plaintext or TLS as configured)."""
    try:
        reader, writer = await asyncio.wait_for(_open(cfg), cfg.connect_timeout_s)
    except (OSError, ssl.SSLError, TimeoutError, UpstreamError):
        return
    try:
        writer.write(CancelRequest(process_id, secret_key).encode())
        await writer.drain()
        await asyncio.wait_for(reader.read(1), cfg.connect_timeout_s)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
