"""Helpers for the protocol-level proxy tests (``test_proxy_*.py``).

* :func:`start_proxy` runs a tenantgate proxy in-process on its own loop in a
  thread (``support.proxy.RunningProxy``) with the :func:`allow_all` inspector.
* :func:`allow_all` is the inspector factory that bypasses SQL analysis: these
  tests are about wire-protocol fidelity, not about the policy.
* :class:`RawClient` speaks the protocol over a plain socket, with its own
  encoders (independent of the proxy's codec) and the client side of SCRAM
  from :mod:`scramp`, for everything drivers cannot be made to send.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from scramp import ScramClient

from support.proxy import RunningProxy
from tenantgate.config import Policy
from tenantgate.hooks import AllowAll, Inspector
from tenantgate.server import ProxyServer
from tenantgate.session import SessionInfo

PROTOCOL_3_0 = 3 << 16
PROTOCOL_3_2 = (3 << 16) | 2
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102


def allow_all(policy: Policy, info: SessionInfo) -> Inspector:
    """Inspector factory for protocol tests: every statement is forwarded unchanged."""
    return AllowAll()


# What the tests get from :func:`start_proxy`.
Proxy = RunningProxy


def start_proxy(policy: Policy) -> Proxy:
    """A running proxy for ``policy`` whose sessions use the :func:`allow_all` inspector."""
    return RunningProxy(policy, inspector_factory=allow_all)


def proxy_server(proxy: Proxy) -> ProxyServer:
    """The ``ProxyServer`` inside a running proxy."""
    return proxy.app.server


def open_connections(proxy: Proxy) -> int:
    """Client connections the proxy is still serving (handshakes and sessions)."""
    return len(proxy_server(proxy)._connections)  # private: the per-connection task set


def stop_when_idle(proxy: Proxy, timeout: float = 10) -> None:
    """Stop ``proxy`` once the connections the tests closed are gone on its side too.

    Shutdown with connections still open is a test of its own
    (``test_proxy_robustness.test_stop_with_open_connections``); module fixtures
    wait so that a close still in flight on the proxy side is not mistaken for one.
    """
    try:
        wait_for(lambda: open_connections(proxy) == 0, timeout)
    finally:
        proxy.stop()


# --- raw protocol -------------------------------------------------------------------


def cstr(text: str) -> bytes:
    return text.encode() + b"\x00"


def first_packet(body: bytes) -> bytes:
    return struct.pack("!I", len(body) + 4) + body


def startup_packet(params: dict[str, str], protocol: int = PROTOCOL_3_0) -> bytes:
    body = struct.pack("!I", protocol)
    body += b"".join(cstr(k) + cstr(v) for k, v in params.items()) + b"\x00"
    return first_packet(body)


def ssl_request() -> bytes:
    return first_packet(struct.pack("!I", SSL_REQUEST))


def gssenc_request() -> bytes:
    return first_packet(struct.pack("!I", GSSENC_REQUEST))


def cancel_request(pid: int, key: bytes) -> bytes:
    return first_packet(struct.pack("!Ii", CANCEL_REQUEST, pid) + key)


def msg(kind: bytes, payload: bytes = b"") -> bytes:
    return kind + struct.pack("!I", len(payload) + 4) + payload


def query(sql: str) -> bytes:
    return msg(b"Q", cstr(sql))


def parse(name: str, sql: str) -> bytes:
    return msg(b"P", cstr(name) + cstr(sql) + struct.pack("!H", 0))


def bind(portal: str, statement: str) -> bytes:
    return msg(b"B", cstr(portal) + cstr(statement) + struct.pack("!HHH", 0, 0, 0))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return msg(b"E", cstr(portal) + struct.pack("!I", max_rows))


def sync() -> bytes:
    return msg(b"S")


def terminate() -> bytes:
    return msg(b"X")


def function_call(oid: int, args: Iterable[bytes]) -> bytes:
    values = list(args)
    payload = struct.pack("!IHH", oid, 0, len(values))
    for value in values:
        payload += struct.pack("!i", len(value)) + value
    payload += struct.pack("!H", 0)
    return msg(b"F", payload)


def error_fields(payload: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse/NoticeResponse payload by code letter."""
    out: dict[str, str] = {}
    for part in payload.split(b"\x00"):
        if part:
            out[chr(part[0])] = part[1:].decode()
    return out


class ServerError(Exception):
    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(f"{fields.get('S')} {fields.get('C')}: {fields.get('M')}")
        self.fields = fields

    @property
    def sqlstate(self) -> str:
        return self.fields.get("C", "")


@dataclass
class Login:
    """What the server said between authentication and the first ReadyForQuery."""

    process_id: int
    secret_key: bytes
    parameters: dict[str, str]
    messages: list[tuple[bytes, bytes]]


class RawClient:
    """A blocking protocol-3 client over a plain socket."""

    def __init__(self, host: str, port: int, timeout: float = 10) -> None:
        self.sock: socket.socket | ssl.SSLSocket = socket.create_connection(
            (host, port), timeout=timeout
        )
        self._buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_byte(self) -> bytes:
        """One byte (the answer to SSLRequest/GSSENCRequest); b"" at EOF."""
        if self._buffer:
            byte = bytes(self._buffer[:1])
            del self._buffer[:1]
            return byte
        return self.sock.recv(1)

    def _fill(self, size: int) -> bool:
        while len(self._buffer) < size:
            chunk = self.sock.recv(256 * 1024)
            if not chunk:
                return False
            self._buffer += chunk
        return True

    def read(self) -> tuple[bytes, bytes] | None:
        """The next (type, payload) message, or None at EOF."""
        if not self._fill(5):
            return None
        kind = bytes(self._buffer[:1])
        (length,) = struct.unpack_from("!I", self._buffer, 1)
        if not self._fill(1 + length):
            return None
        payload = bytes(self._buffer[5 : 1 + length])
        del self._buffer[: 1 + length]
        return kind, payload

    def expect(self, kind: bytes) -> bytes:
        """Read one message that must be of ``kind`` (an ErrorResponse raises ServerError)."""
        item = self.read()
        assert item is not None, f"connection closed while waiting for {kind!r}"
        got, payload = item
        if got == b"E" and kind != b"E":
            raise ServerError(error_fields(payload))
        assert got == kind, f"expected {kind!r}, got {got!r} {payload[:200]!r}"
        return payload

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        """Messages up to and including ReadyForQuery."""
        out: list[tuple[bytes, bytes]] = []
        while True:
            item = self.read()
            assert item is not None, f"connection closed before ReadyForQuery; got {out!r}"
            out.append(item)
            if item[0] == b"Z":
                return out

    def read_to_eof(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        while (item := self.read()) is not None:
            out.append(item)
        return out

    def closed_by_peer(self, timeout: float = 5) -> bool:
        """True once the peer closes the connection (messages before EOF are skipped)."""
        self.sock.settimeout(timeout)
        try:
            self.read_to_eof()
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
        return True

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None = None) -> None:
        assert not self._buffer
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def login(
        self,
        user: str,
        password: str,
        database: str = "app",
        protocol: int = PROTOCOL_3_0,
        extra: dict[str, str] | None = None,
        mechanism: str = "SCRAM-SHA-256",
        channel_binding: tuple[str, bytes | ssl.SSLSocket] | None = None,
    ) -> Login:
        """Startup + SCRAM-SHA-256[-PLUS] (client side by scramp) up to ReadyForQuery."""
        self.send(startup_packet({"user": user, "database": database, **(extra or {})}, protocol))
        messages: list[tuple[bytes, bytes]] = []
        scram: ScramClient | None = None
        parameters: dict[str, str] = {}
        pid, key = 0, b""
        while True:
            item = self.read()
            assert item is not None, f"connection closed during login; got {messages!r}"
            kind, payload = item
            messages.append(item)
            if kind == b"E":
                raise ServerError(error_fields(payload))
            if kind == b"R":
                (code,) = struct.unpack_from("!i", payload)
                data = payload[4:]
                if code == 10:
                    mechanisms = [m.decode() for m in data.split(b"\x00") if m]
                    assert mechanism in mechanisms, mechanisms
                    scram = ScramClient([mechanism], user, password, channel_binding)
                    first = scram.get_client_first().encode()
                    body = cstr(mechanism) + struct.pack("!i", len(first)) + first
                    self.send(msg(b"p", body))
                elif code == 11:
                    assert scram is not None
                    scram.set_server_first(data.decode())
                    self.send(msg(b"p", scram.get_client_final().encode()))
                elif code == 12:
                    assert scram is not None
                    scram.set_server_final(data.decode())
                else:
                    assert code == 0, f"unexpected authentication request {code}"
            elif kind == b"S":
                name, value, _ = payload.split(b"\x00", 2)
                parameters[name.decode()] = value.decode()
            elif kind == b"K":
                (pid,) = struct.unpack_from("!i", payload)
                key = payload[4:]
            elif kind == b"Z":
                return Login(pid, key, parameters, messages)

    def simple(self, sql: str) -> list[tuple[bytes, bytes]]:
        """Send a simple Query; the messages up to ReadyForQuery."""
        self.send(query(sql))
        return self.read_until_ready()


def rows_of(messages: list[tuple[bytes, bytes]]) -> list[list[str | None]]:
    """Text DataRow values of a response."""
    out: list[list[str | None]] = []
    for kind, payload in messages:
        if kind != b"D":
            continue
        (count,) = struct.unpack_from("!H", payload)
        pos = 2
        row: list[str | None] = []
        for _ in range(count):
            (length,) = struct.unpack_from("!i", payload, pos)
            pos += 4
            if length < 0:
                row.append(None)
            else:
                row.append(payload[pos : pos + length].decode())
                pos += length
        out.append(row)
    return out


def errors_of(messages: list[tuple[bytes, bytes]]) -> list[dict[str, str]]:
    return [error_fields(payload) for kind, payload in messages if kind == b"E"]


# --- misc ---------------------------------------------------------------------------


def self_signed_cert(directory: Path, host: str = "127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate and key for ``host`` (PEM files in ``directory``)."""
    import ipaddress  # noqa: PLC0415

    from cryptography import x509  # noqa: PLC0415
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: PLC0415
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415
    from cryptography.x509.oid import NameOID  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "server.crt", directory / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def rss_bytes() -> int:
    """Resident set size of this process (the in-process proxy included)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class RssSampler:
    """Samples the process RSS in a thread; ``peak`` is the highest value seen."""

    def __init__(self, interval: float = 0.05) -> None:
        self.start_rss = rss_bytes()
        self.peak = self.start_rss
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def growth(self) -> int:
        return self.peak - self.start_rss


def wait_for(predicate: Callable[[], bool], timeout: float = 10, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
