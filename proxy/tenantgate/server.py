"""The listener: accepts clients, runs their handshake, owns the session registry.

Owns connection-level policy that spans sessions: global and per-tenant
connection limits, the handshake timeout, cancel-key lookup (constant-time
key comparison, forwarded only while the target runs a statement), policy
swaps on reload, and draining on shutdown.  Every exception of a session ends
here as a FATAL to that client and a log line, never as a traceback to the
client or a dead proxy.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import ssl
import time
import uuid
from collections import Counter
from collections.abc import Callable

from tenantgate.auth import tls_server_end_point
from tenantgate.config import Policy, TenantLimits
from tenantgate.errors import (
    AuthenticationFailed,
    PgError,
    ProtocolError,
    UpstreamError,
    auth_failed,
    internal_error,
    protocol_violation,
    shutting_down,
    startup_refused,
    tenant_removed,
    timeout,
    too_many_clients,
    too_many_connections_for_tenant,
    upstream_unavailable,
)
from tenantgate.handshake import TlsSettings, authenticate, check_startup, negotiate
from tenantgate.hooks import Inspector
from tenantgate.injection import TenantInjector
from tenantgate.protocol.backend import (
    BackendKeyData,
    ErrorResponse,
    ParameterStatus,
    ReadyForQuery,
)
from tenantgate.protocol.startup import CancelRequest
from tenantgate.session import Session, SessionEnded, SessionInfo
from tenantgate.upstream import connect, send_cancel

log = logging.getLogger("tenantgate.server")

InspectorFactory = Callable[[Policy, SessionInfo], Inspector]
UPSTREAM_CLOSE_WAIT_S = 2.0


def load_tls(policy: Policy) -> TlsSettings | None:
    tls = policy.listen.tls
    if tls is None:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(tls.cert), str(tls.key))
    from cryptography import x509  # noqa: PLC0415 - only with TLS
    from cryptography.hazmat.primitives.serialization import Encoding  # noqa: PLC0415

    pem = tls.cert.read_bytes()
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    return TlsSettings(context, tls.require, tls_server_end_point(der))


class ProxyServer:
    """The proxy: one per process."""

    def __init__(self, policy: Policy, inspector_factory: InspectorFactory) -> None:
        self.policy = policy
        self._inspector_factory = inspector_factory
        self._tls = load_tls(policy)
        self._server: asyncio.Server | None = None
        self.sessions: dict[int, Session] = {}
        self._connections: set[asyncio.Task[None]] = set()
        self._in_handshake: set[asyncio.Task[None]] = set()
        self._ended: dict[asyncio.Task[None], Session] = {}
        self._client_count = 0
        self._tenant_connections: Counter[str] = Counter()
        self.accepting = True
        self.on_session_start: Callable[[Session], None] | None = None
        self.on_session_end: Callable[[Session], None] | None = None
        self.on_auth_failure: Callable[[str], None] | None = None
        # Per-statement rate limit, given the tenant: seconds to wait, or None to
        # refuse (53400).
        self.rate_limit: Callable[[str], float | None] | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        listen = self.policy.listen
        self._server = await asyncio.start_server(
            self._accept, listen.host, listen.port, limit=256 * 1024, backlog=4096
        )
        log.info("listening on %s:%d", listen.host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting; let open transactions finish within ``grace_s``; end the rest."""
        self.accepting = False
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self._any_in_transaction():  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        for session in list(self.sessions.values()):
            session.end(shutting_down())
        for task in list(self._in_handshake):
            task.cancel()
        if self._connections:
            await asyncio.wait(set(self._connections), timeout=max(grace_s, 5.0))
        if self._server is not None:
            await self._server.wait_closed()

    async def upstream_reachable(self) -> bool:
        """Whether a TCP connection to the upstream succeeds (for /readyz)."""
        upstream = self.policy.upstream
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(upstream.host, upstream.port), upstream.connect_timeout_s
            )
        except (OSError, TimeoutError):
            return False
        writer.close()
        return True

    def _any_in_transaction(self) -> bool:
        return any(not s.quiet for s in self.sessions.values())

    def swap_policy(self, policy: Policy) -> None:
        """New sessions and each session's next statement use ``policy``."""
        self.policy = policy
        for session in list(self.sessions.values()):
            found = policy.find_user(session.info.user)
            if found is None or found[0] != session.info.tenant:
                session.end(tenant_removed())
            else:
                session.replace_inspector(self._inspector_factory(policy, session.info))
                self._set_rate_limit(session, policy)

    def _set_rate_limit(self, session: Session, policy: Policy) -> None:
        """The tenant's statement rate, and the limiter's hook only if it has one (a
        session of an unlimited tenant skips the call per statement)."""
        session.rate = policy.tenants[session.info.tenant].limits.queries_per_second
        session.rate_limit = self.rate_limit if session.rate is not None else None

    # --- per connection --------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self._client_count += 1
        try:
            await self._serve_client(reader, writer)
        except asyncio.CancelledError:
            # Only shutdown cancels connection tasks (those still in their handshake).
            _send_error(writer, shutting_down())
        except Exception:  # the last line of defence: log, never crash the proxy
            log.exception("unexpected error in a client connection")
            _send_error(writer, internal_error())
        finally:
            self._client_count -= 1
            self._in_handshake.discard(task)
            if not writer.is_closing():
                writer.close()
            ended = self._ended.pop(task, None)
            if ended is not None:
                # Off the connection counts, but still a connection task, so shutdown
                # waits until the upstream transport (a TLS close needs the loop) is shut.
                await ended.wait_upstream_closed(UPSTREAM_CLOSE_WAIT_S)
            self._connections.discard(task)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        policy = self.policy
        peer = _peer(writer)
        if not self.accepting:
            _send_error(writer, shutting_down())
            return
        if self._client_count > policy.limits.max_client_connections:
            _send_error(writer, too_many_clients())
            return
        user = ""
        task = asyncio.current_task()
        assert task is not None
        self._in_handshake.add(task)
        try:
            async with asyncio.timeout(policy.limits.handshake_timeout_s):
                first, encrypted = await negotiate(reader, writer, self._tls)
                if isinstance(first, CancelRequest):
                    await self._cancel(first)
                    return
                if self._tls is not None and self._tls.require and not encrypted:
                    raise startup_refused("this proxy requires TLS (sslmode=require)", "28000")
                user, forwarded, negotiation = check_startup(first, policy)
                if negotiation is not None:
                    writer.write(negotiation.encode())
                binding = self._tls.end_point_hash if (self._tls and encrypted) else None
                tenant = await authenticate(reader, writer, user, policy, binding)
                await writer.drain()
        except TimeoutError:
            _send_error(writer, timeout("the client did not complete the handshake in time"))
            return
        except AuthenticationFailed as failure:
            if self.on_auth_failure is not None:
                self.on_auth_failure(failure.reason)
            _send_error(writer, auth_failed(user))
            return
        except PgError as error:
            _send_error(writer, error)
            return
        except ProtocolError as exc:
            _send_error(writer, protocol_violation(str(exc)))
            return
        except (EOFError, ConnectionError, ssl.SSLError, OSError):
            return
        finally:
            self._in_handshake.discard(task)
        limit = policy.tenants[tenant].limits.max_connections
        if limit is not None and self._tenant_connections[tenant] >= limit:
            _send_error(writer, too_many_connections_for_tenant())
            return
        self._tenant_connections[tenant] += 1
        try:
            await self._run_session(
                reader, writer, policy, tenant, user, first.minor, forwarded, peer
            )
        finally:
            self._tenant_connections[tenant] -= 1

    async def _run_session(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        policy: Policy,
        tenant: str,
        user: str,
        protocol_minor: int,
        forwarded: dict[str, str],
        peer: str,
    ) -> None:
        tenant_cfg = policy.tenants[tenant]
        try:
            upstream = await connect(
                policy.upstream,
                {**forwarded, **tenant_startup_settings(tenant_cfg.limits)},
                tenant_cfg.upstream_user,
                tenant_cfg.upstream_password,
            )
        except UpstreamError as exc:
            log.warning("upstream connection failed for tenant %s: %s", tenant, exc)
            _send_error(writer, upstream_unavailable(str(exc)))
            return
        pid, key = Session.new_cancel_key(protocol_minor)
        while pid in self.sessions:
            pid, key = Session.new_cancel_key(protocol_minor)
        info = SessionInfo(
            uuid.uuid4().hex[:16], tenant, user, peer, protocol_minor, pid, key, time.time()
        )
        session = Session(
            info,
            reader,
            writer,
            upstream,
            self._inspector_factory(policy, info),
            policy.limits.max_message_bytes,
            TenantInjector(policy.tenant_setting, tenant) if policy.injects_tenant else None,
        )
        greeting = [
            ParameterStatus(n, upstream.parameters[n]).encode() for n in upstream.parameter_order
        ]
        greeting.append(BackendKeyData(pid, key).encode())
        greeting.append(ReadyForQuery("I").encode())
        self._set_rate_limit(session, policy)
        session.idle_timeout_s = policy.limits.idle_client_timeout_s
        self.sessions[pid] = session
        if self.on_session_start is not None:
            self.on_session_start(session)
        try:
            writer.write(b"".join(greeting))
            await writer.drain()
            await session.run()
        except SessionEnded as ended:
            if ended.error is not None:
                _send_error(writer, ended.error)
        except ProtocolError as exc:
            log.info("session %s: protocol error: %s", info.session_id, exc)
            _send_error(writer, protocol_violation(str(exc)))
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        finally:
            del self.sessions[pid]
            upstream.close()
            if self.on_session_end is not None:
                self.on_session_end(session)
            task = asyncio.current_task()
            if task is not None:
                self._ended[task] = session

    async def _cancel(self, request: CancelRequest) -> None:
        session = self.sessions.get(request.process_id)
        if session is None:
            return
        if not hmac.compare_digest(session.info.secret_key, request.secret_key):
            return
        if not session.busy:
            return  # never let a stale cancel hit the client's next statement
        upstream = session.upstream
        await send_cancel(self.policy.upstream, upstream.process_id, upstream.secret_key)


def tenant_startup_settings(limits: TenantLimits) -> dict[str, str]:
    """Tenant limits the upstream enforces itself, as startup-packet defaults.

    Values from the startup packet are what RESET returns to, and the policy
    refuses SET statement_timeout above the limit (or 0), so a client can lower
    the timeout but never raise it.
    """
    settings: dict[str, str] = {}
    if limits.statement_timeout_ms is not None:
        settings["statement_timeout"] = str(limits.statement_timeout_ms)
    if limits.idle_in_transaction_timeout_ms is not None:
        settings["idle_in_transaction_session_timeout"] = str(limits.idle_in_transaction_timeout_ms)
    return settings


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


def _send_error(writer: asyncio.StreamWriter, error: PgError) -> None:
    if writer.is_closing():
        return
    with contextlib.suppress(ConnectionError, OSError, RuntimeError):
        writer.write(ErrorResponse.from_error(error).encode())
