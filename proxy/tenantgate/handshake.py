"""The client side of connection start: first packets, TLS, startup checks, login.

Owns everything between accept() and "this client is tenant X": SSLRequest
(refusing bytes pipelined before the TLS handshake), GSSENCRequest (answered
'N'), CancelRequest (handed back to the caller), protocol 3.0/3.2 and
NegotiateProtocolVersion, refusing replication and foreign databases, picking
the allow-listed startup values, and the SCRAM exchange against the policy.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from dataclasses import dataclass, field

from tenantgate.auth import SCRAM, SCRAM_PLUS, ScramExchange, fake_verifier, verifier_for_entry
from tenantgate.config import Policy
from tenantgate.errors import (
    AuthenticationFailed,
    RemoteProtocolError,
    database_refused,
    startup_refused,
)
from tenantgate.protocol.backend import (
    AUTH_OK,
    AUTH_SASL_CONTINUE,
    AUTH_SASL_FINAL,
    Authentication,
    NegotiateProtocolVersion,
)
from tenantgate.protocol.framing import FirstPacketReader, MessageReader
from tenantgate.protocol.frontend import SASLInitialResponse
from tenantgate.protocol.startup import (
    PROTOCOL_3_2,
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_first_packet,
)

log = logging.getLogger("tenantgate.handshake")

# Startup values a client may pass through (case-insensitive GUC names -> canonical).
FORWARDED_STARTUP = {
    "application_name": "application_name",
    "datestyle": "DateStyle",
    "timezone": "TimeZone",
    "extra_float_digits": "extra_float_digits",
}
# Compared after dropping quotes, case, "-" and "_" (asyncpg sends 'utf-8' quoted).
ACCEPTED_CLIENT_ENCODINGS = frozenset({"utf8", "unicode", "sqlascii"})
MAX_SASL_MESSAGE = 1024
READ_CHUNK = 64 * 1024


@dataclass(slots=True)
class ClientHello:
    """What the handshake learned about the client."""

    user: str
    tenant: str
    protocol_minor: int
    forwarded: dict[str, str] = field(default_factory=dict)
    tls: bool = False
    cancel: CancelRequest | None = None


class TlsSettings:
    """Server TLS context plus the channel-binding data of its certificate."""

    def __init__(
        self, context: ssl.SSLContext, require: bool, end_point_hash: bytes | None
    ) -> None:
        self.context = context
        self.require = require
        self.end_point_hash = end_point_hash


def _buffered(reader: asyncio.StreamReader) -> int:
    # StreamReader exposes no public "bytes waiting" count; the private buffer is
    # the only way to detect plaintext pipelined behind an SSLRequest.
    buffer = getattr(reader, "_buffer", b"")
    return len(buffer)


async def read_first_packet(reader: asyncio.StreamReader, packets: FirstPacketReader) -> bytes:
    while (body := packets.next_packet()) is None:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise EOFError("client closed the connection during startup")
        packets.feed(data)
    return body


async def negotiate(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tls: TlsSettings | None
) -> tuple[StartupMessage | CancelRequest, bool]:
    """Handle SSL/GSSENC requests until a StartupMessage or CancelRequest arrives."""
    packets = FirstPacketReader()
    encrypted = False
    while True:
        packet = decode_first_packet(await read_first_packet(reader, packets))
        if isinstance(packet, SSLRequest):
            if encrypted:
                raise RemoteProtocolError("SSLRequest after TLS was established")
            if tls is None:
                writer.write(b"N")
                continue
            if packets.trailing or _buffered(reader):
                raise RemoteProtocolError("data received before the TLS handshake")
            writer.write(b"S")
            await writer.drain()
            await writer.start_tls(tls.context)
            encrypted = True
            continue
        if isinstance(packet, GSSENCRequest):
            if encrypted:
                raise RemoteProtocolError("GSSENCRequest after TLS was established")
            writer.write(b"N")
            continue
        if packets.trailing:
            raise RemoteProtocolError("data received after the startup packet")
        return packet, encrypted


def check_startup(
    startup: StartupMessage, policy: Policy
) -> tuple[str, dict[str, str], NegotiateProtocolVersion | None]:
    """Validate the startup packet; return (user, forwarded values, 'v' to send or None)."""
    user = startup.get("user")
    if not user:
        raise startup_refused("no user name in the startup packet", "28000")
    if startup.get("replication") not in (None, "false", "off", "0", "no"):
        raise startup_refused("replication connections are not supported", "28000")
    options = startup.get("options")
    if options and options.strip():
        raise startup_refused(
            "startup options are not forwarded; set values with SQL instead", "0A000"
        )
    database = startup.get("database") or user
    if database != policy.upstream.database:
        raise database_refused(database)
    encoding = startup.get("client_encoding")
    if encoding is not None and _encoding_key(encoding) not in ACCEPTED_CLIENT_ENCODINGS:
        raise startup_refused(
            f"client_encoding {encoding!r} is not supported; tenantgate speaks UTF8", "22023"
        )
    forwarded: dict[str, str] = {}
    unknown_protocol_options: list[str] = []
    for name, value in startup.parameters:
        canonical = FORWARDED_STARTUP.get(name.lower())
        if canonical is not None:
            forwarded[canonical] = value
        elif name.startswith("_pq_."):
            unknown_protocol_options.append(name)
    negotiation = None
    if startup.minor > 2 or unknown_protocol_options:
        negotiation = NegotiateProtocolVersion(
            min(startup.protocol, PROTOCOL_3_2), tuple(unknown_protocol_options)
        )
    return user, forwarded, negotiation


def _encoding_key(name: str) -> str:
    return name.strip().strip("'\"").lower().replace("-", "").replace("_", "")


async def authenticate(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    user: str,
    policy: Policy,
    channel_binding: bytes | None,
) -> str:
    """Run SCRAM against the policy; return the tenant id or raise AuthenticationFailed."""
    found = policy.find_user(user)
    verifier = verifier_for_entry(found[1].password) if found else fake_verifier(user)
    mechanisms = (SCRAM_PLUS, SCRAM) if channel_binding is not None else (SCRAM,)
    writer.write(Authentication.sasl(mechanisms).encode())
    await writer.drain()
    messages = MessageReader(max_size=MAX_SASL_MESSAGE)
    initial = SASLInitialResponse.decode(await _password_message(reader, messages))
    if initial.mechanism not in mechanisms or initial.response is None:
        raise AuthenticationFailed("bad_mechanism")
    exchange = ScramExchange(
        verifier, initial.mechanism, channel_binding, channel_binding is not None
    )
    server_first = exchange.client_first(initial.response)
    if server_first is None:
        log.info("SCRAM failed for user %r: %s", user, exchange.failed_reason)
        raise AuthenticationFailed("bad_scram_message")
    writer.write(Authentication(AUTH_SASL_CONTINUE, server_first).encode())
    await writer.drain()
    server_final = exchange.client_final(await _password_message(reader, messages))
    if server_final is None or found is None:
        log.info(
            "authentication failed for user %r: %s", user, exchange.failed_reason or "unknown user"
        )
        raise AuthenticationFailed("unknown_user" if found is None else "wrong_password")
    writer.write(
        Authentication(AUTH_SASL_FINAL, server_final).encode() + Authentication(AUTH_OK).encode()
    )
    return found[0]


async def _password_message(reader: asyncio.StreamReader, messages: MessageReader) -> bytes:
    while (item := messages.next_message()) is None:
        data = await reader.read(READ_CHUNK)
        if not data:
            raise EOFError("client closed the connection during authentication")
        messages.feed(data)
    msg_type, payload = item
    if msg_type != ord("p"):
        raise RemoteProtocolError(f"expected a password message, got {chr(msg_type)!r}")
    if messages.buffered:
        raise RemoteProtocolError("data received before authentication finished")
    return payload
