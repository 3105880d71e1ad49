"""Client authentication: SCRAM-SHA-256 (and -PLUS) verifiers and the server side
of the exchange, sans-IO.

Owns the verifier format (the one PostgreSQL stores in pg_authid:
``SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>``), making verifiers
(``tenantgate hash-password``), and :class:`ScramExchange`, which turns client
SASL messages into server replies using :mod:`scramp` for the cryptography.
Unknown users run the same exchange against a fake verifier derived from a
per-process secret, so timing and messages do not reveal whether a user exists.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from functools import lru_cache

from scramp import ScramMechanism

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
DEFAULT_ITERATIONS = 4096
_FAKE_SECRET = secrets.token_bytes(32)


@dataclass(frozen=True, slots=True)
class ScramVerifier:
    iterations: int
    salt: bytes
    stored_key: bytes
    server_key: bytes

    def encode(self) -> str:
        b64 = base64.b64encode
        return (
            f"{SCRAM}${self.iterations}:{b64(self.salt).decode()}"
            f"${b64(self.stored_key).decode()}:{b64(self.server_key).decode()}"
        )


def parse_verifier(text: str) -> ScramVerifier | None:
    """Parse a stored verifier; None if ``text`` is not one (e.g. a plaintext password)."""
    try:
        mech, rest = text.split("$", 1)
        iter_salt, keys = rest.split("$", 1)
        iterations, salt = iter_salt.split(":", 1)
        stored, server = keys.split(":", 1)
        if mech != SCRAM:
            return None
        verifier = ScramVerifier(
            int(iterations),
            base64.b64decode(salt, validate=True),
            base64.b64decode(stored, validate=True),
            base64.b64decode(server, validate=True),
        )
    except (ValueError, binascii.Error):
        return None
    if len(verifier.stored_key) != 32 or len(verifier.server_key) != 32 or verifier.iterations < 1:
        return None
    return verifier


def make_verifier(
    password: str, iterations: int = DEFAULT_ITERATIONS, salt: bytes | None = None
) -> ScramVerifier:
    """A new verifier for ``password`` (random 16-byte salt unless given)."""
    mech = ScramMechanism(SCRAM)
    salt_out, stored, server, count = mech.make_auth_info(
        password, iteration_count=iterations, salt=salt or secrets.token_bytes(16)
    )
    return ScramVerifier(count, salt_out, stored, server)


@lru_cache(maxsize=4096)
def verifier_for_entry(password_entry: str) -> ScramVerifier:
    """The verifier of a policy user entry: parsed, or derived once from plaintext.

    Plaintext entries get a salt derived from the process secret so the cache
    key is the only state; the derivation costs 4096 PBKDF2 rounds once.
    """
    parsed = parse_verifier(password_entry)
    if parsed is not None:
        return parsed
    salt = hmac.new(_FAKE_SECRET, b"plain:" + password_entry.encode(), hashlib.sha256).digest()[:16]
    return make_verifier(password_entry, salt=salt)


def fake_verifier(user: str) -> ScramVerifier:
    """A stable verifier nobody knows the password of, for unknown users."""
    seed = hmac.new(_FAKE_SECRET, b"user:" + user.encode(), hashlib.sha256).digest()
    return ScramVerifier(DEFAULT_ITERATIONS, seed[:16], hashlib.sha256(seed).digest(), seed)


def tls_server_end_point(cert_der: bytes) -> bytes:
    """RFC 5929 channel binding data: hash of the server certificate.

    SHA-256 unless the certificate's signature uses a stronger hash (MD5/SHA-1 map to SHA-256).
    """
    from cryptography import x509  # noqa: PLC0415 - only needed with TLS
    from cryptography.hazmat.primitives import hashes  # noqa: PLC0415

    cert = x509.load_der_x509_certificate(cert_der)
    algorithm = cert.signature_hash_algorithm
    if algorithm is None or isinstance(algorithm, hashes.MD5 | hashes.SHA1 | hashes.SHA224):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert_der)
    return digest.finalize()


class ScramExchange:
    """Server side of one SCRAM-SHA-256(-PLUS) exchange (RFC 5802, RFC 7677).

    Written here rather than taken from :mod:`scramp` because PostgreSQL
    clients send an empty ``n=`` user name (the user travels in the startup
    packet), which scramp's server refuses.  Only message parsing lives here;
    the primitives are :mod:`hmac`/:mod:`hashlib`, and the proof is compared
    with :func:`hmac.compare_digest`.

    Call :meth:`client_first`, then :meth:`client_final`; each returns the
    server message to send, or None when the exchange failed (then
    :attr:`failed_reason` says why, for the log only).
    """

    def __init__(
        self,
        verifier: ScramVerifier,
        mechanism: str,
        channel_binding: bytes | None,
        plus_offered: bool = False,
    ) -> None:
        if mechanism not in (SCRAM, SCRAM_PLUS):
            raise ValueError(f"unsupported mechanism {mechanism!r}")
        if mechanism == SCRAM_PLUS and channel_binding is None:
            raise ValueError("SCRAM-SHA-256-PLUS needs channel binding data")
        self._verifier = verifier
        self.mechanism = mechanism
        self._cb_data = channel_binding
        self._plus_offered = plus_offered
        self._gs2_header = b""
        self._client_first_bare = ""
        self._server_first = ""
        self._nonce = ""
        self.succeeded = False
        self.failed_reason: str | None = None

    def _fail(self, reason: str) -> None:
        self.failed_reason = reason

    def client_first(self, message: bytes) -> bytes | None:
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("client-first is not UTF-8")
            return None
        parts = text.split(",", 2)
        if len(parts) != 3:
            self._fail("malformed client-first")
            return None
        cbind_flag, authzid, bare = parts
        if authzid:
            self._fail("authorization identity is not supported")
            return None
        if self.mechanism == SCRAM_PLUS:
            if cbind_flag != "p=tls-server-end-point":
                self._fail("SCRAM-SHA-256-PLUS requires tls-server-end-point binding")
                return None
        elif cbind_flag == "y" and self._plus_offered:
            # The client supports binding and we offered it: a stripped mechanism list.
            self._fail("channel binding downgrade detected")
            return None
        elif cbind_flag not in ("n", "y"):
            self._fail("channel binding requested with SCRAM-SHA-256")
            return None
        attributes = bare.split(",")
        if (
            len(attributes) < 2
            or not attributes[0].startswith("n=")
            or not attributes[1].startswith("r=")
        ):
            self._fail("malformed client-first-bare")
            return None
        client_nonce = attributes[1][2:]
        if not client_nonce or any(c == "," or not 0x21 <= ord(c) <= 0x7E for c in client_nonce):
            self._fail("invalid client nonce")
            return None
        self._gs2_header = f"{cbind_flag},{authzid},".encode()
        self._client_first_bare = bare
        self._nonce = client_nonce + base64.b64encode(secrets.token_bytes(18)).decode()
        salt = base64.b64encode(self._verifier.salt).decode()
        self._server_first = f"r={self._nonce},s={salt},i={self._verifier.iterations}"
        return self._server_first.encode()

    def client_final(self, message: bytes) -> bytes | None:
        if not self._server_first:
            self._fail("client-final before client-first")
            return None
        try:
            text = message.decode("utf-8")
        except UnicodeDecodeError:
            self._fail("client-final is not UTF-8")
            return None
        without_proof, sep, proof_b64 = text.rpartition(",p=")
        attributes = without_proof.split(",")
        if not sep or len(attributes) < 2:
            self._fail("malformed client-final")
            return None
        expected_c = base64.b64encode(self._gs2_header + (self._cb_data or b"")).decode()
        if self.mechanism == SCRAM:
            expected_c = base64.b64encode(self._gs2_header).decode()
        if not hmac.compare_digest(attributes[0].encode(), f"c={expected_c}".encode()):
            self._fail("channel binding mismatch")
            return None
        if not hmac.compare_digest(attributes[1].encode(), f"r={self._nonce}".encode()):
            self._fail("nonce mismatch")
            return None
        try:
            proof = base64.b64decode(proof_b64, validate=True)
        except (ValueError, binascii.Error):
            self._fail("proof is not base64")
            return None
        auth_message = f"{self._client_first_bare},{self._server_first},{without_proof}".encode()
        verifier = self._verifier
        client_signature = hmac.new(verifier.stored_key, auth_message, hashlib.sha256).digest()
        if len(proof) != len(client_signature):
            self._fail("proof has the wrong length")
            return None
        client_key = bytes(a ^ b for a, b in zip(proof, client_signature, strict=True))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), verifier.stored_key):
            self._fail("wrong password")
            return None
        server_signature = hmac.new(verifier.server_key, auth_message, hashlib.sha256).digest()
        self.succeeded = True
        return b"v=" + base64.b64encode(server_signature)
