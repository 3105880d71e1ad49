"""auth: SCRAM verifiers and the server side of SCRAM-SHA-256(-PLUS), against scramp's
client and against a hand-written RFC 5802 client (libpq style, empty user name)."""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st
from scramp import ScramClient

from tenantgate.auth import (
    DEFAULT_ITERATIONS,
    SCRAM,
    SCRAM_PLUS,
    ScramExchange,
    ScramVerifier,
    fake_verifier,
    make_verifier,
    parse_verifier,
    tls_server_end_point,
    verifier_for_entry,
)

PASSWORD = "correct horse battery staple"
SALT = bytes(range(16))
VERIFIER = make_verifier(PASSWORD, salt=SALT)
CB_DATA = hashlib.sha256(b"pretend this is a certificate").digest()
CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def salted_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) per RFC 5802 section 3."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return client_key, server_key


class HandClient:
    """A minimal RFC 5802 client, written from the RFC, sending what libpq sends."""

    def __init__(
        self,
        password: str,
        gs2_header: str = "n,,",
        cb_data: bytes = b"",
        user: str = "",
        nonce: str = CLIENT_NONCE,
    ) -> None:
        self.password = password
        self.gs2_header = gs2_header
        self.cb_data = cb_data
        self.nonce = nonce
        self.bare = f"n={user},r={nonce}"
        self.server_signature = b""

    def first(self) -> bytes:
        return (self.gs2_header + self.bare).encode()

    def final(self, server_first: bytes, nonce: str | None = None) -> bytes:
        attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
        assert attrs["r"].startswith(self.nonce)
        salt, iterations = base64.b64decode(attrs["s"]), int(attrs["i"])
        channel = b64(self.gs2_header.encode() + self.cb_data)
        without_proof = f"c={channel},r={attrs['r'] if nonce is None else nonce}"
        auth_message = f"{self.bare},{server_first.decode()},{without_proof}".encode()
        client_key, server_key = salted_keys(self.password, salt, iterations)
        stored_key = hashlib.sha256(client_key).digest()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.server_signature = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={b64(proof)}".encode()

    def check_server_final(self, message: bytes) -> bool:
        return message == b"v=" + b64(self.server_signature).encode()


def run(exchange: ScramExchange, client: HandClient) -> bytes | None:
    server_first = exchange.client_first(client.first())
    assert server_first is not None, exchange.failed_reason
    return exchange.client_final(client.final(server_first))


# --- verifiers ------------------------------------------------------------------------


def test_make_verifier_matches_rfc_computation() -> None:
    client_key, server_key = salted_keys(PASSWORD, SALT, DEFAULT_ITERATIONS)
    expected = ScramVerifier(
        DEFAULT_ITERATIONS, SALT, hashlib.sha256(client_key).digest(), server_key
    )
    assert expected == VERIFIER


def test_verifier_encode_parse_round_trip() -> None:
    text = VERIFIER.encode()
    assert text == (
        f"SCRAM-SHA-256$4096:{b64(SALT)}${b64(VERIFIER.stored_key)}:{b64(VERIFIER.server_key)}"
    )
    assert parse_verifier(text) == VERIFIER


def test_make_verifier_random_salt_and_iterations() -> None:
    a, b = make_verifier("pw", iterations=4100), make_verifier("pw", iterations=4100)
    assert a.iterations == 4100
    assert len(a.salt) == 16
    assert a.salt != b.salt
    assert a.stored_key != b.stored_key


@pytest.mark.parametrize(
    "text",
    [
        "plaintext password",
        "",
        "md5" + "0" * 32,
        VERIFIER.encode().replace("SCRAM-SHA-256", "SCRAM-SHA-1", 1),
        VERIFIER.encode().replace("$4096:", "$x:", 1),
        VERIFIER.encode().replace("$4096:", "$0:", 1),
        VERIFIER.encode().replace("$4096:", "$-1:", 1),
        VERIFIER.encode().replace(b64(SALT), "!!!notbase64", 1),
        f"SCRAM-SHA-256$4096:{b64(SALT)}${b64(b'short')}:{b64(VERIFIER.server_key)}",
        f"SCRAM-SHA-256$4096:{b64(SALT)}${b64(VERIFIER.stored_key)}:{b64(b'x' * 31)}",
        f"SCRAM-SHA-256$4096:{b64(SALT)}${b64(VERIFIER.stored_key)}",
        "SCRAM-SHA-256$4096",
        "SCRAM-SHA-256$$:",
    ],
)
def test_parse_verifier_rejects(text: str) -> None:
    assert parse_verifier(text) is None


def test_verifier_for_entry_plaintext_and_verifier() -> None:
    assert verifier_for_entry(VERIFIER.encode()) == VERIFIER
    derived = verifier_for_entry("plain-pw")
    assert derived is verifier_for_entry("plain-pw")  # derived once
    assert derived != verifier_for_entry("other-pw")
    exchange = ScramExchange(derived, SCRAM, None)
    assert run(exchange, HandClient("plain-pw")) is not None
    assert exchange.succeeded


def test_fake_verifier_is_stable_per_user_and_unknowable() -> None:
    fake = fake_verifier("mallory")
    assert fake == fake_verifier("mallory")
    assert fake != fake_verifier("alice")
    assert fake.iterations == DEFAULT_ITERATIONS
    assert len(fake.salt) == 16
    assert parse_verifier(fake.encode()) == fake  # looks like a real verifier
    for password in ("", "mallory", PASSWORD):
        exchange = ScramExchange(fake, SCRAM, None)
        assert run(exchange, HandClient(password)) is None
        assert exchange.failed_reason == "wrong password"
        assert not exchange.succeeded


def test_fake_verifier_server_first_looks_real() -> None:
    real = ScramExchange(VERIFIER, SCRAM, None).client_first(b"n,,n=,r=abc")
    fake = ScramExchange(fake_verifier("nobody"), SCRAM, None).client_first(b"n,,n=,r=abc")
    assert real is not None
    assert fake is not None
    shape = [(part[:2], len(part)) for part in real.split(b",")]
    assert [(part[:2], len(part)) for part in fake.split(b",")] == shape


# --- the exchange: scramp client ------------------------------------------------------


def test_scramp_client_logs_in() -> None:
    client = ScramClient([SCRAM], "alice", PASSWORD)
    exchange = ScramExchange(VERIFIER, SCRAM, None)
    server_first = exchange.client_first(client.get_client_first().encode())
    assert server_first is not None
    client.set_server_first(server_first.decode())
    server_final = exchange.client_final(client.get_client_final().encode())
    assert server_final is not None
    client.set_server_final(server_final.decode())  # raises if the server signature is wrong
    assert exchange.succeeded
    assert exchange.failed_reason is None


def test_scramp_client_wrong_password() -> None:
    client = ScramClient([SCRAM], "alice", "wrong")
    exchange = ScramExchange(VERIFIER, SCRAM, None)
    server_first = exchange.client_first(client.get_client_first().encode())
    assert server_first is not None
    client.set_server_first(server_first.decode())
    assert exchange.client_final(client.get_client_final().encode()) is None
    assert exchange.failed_reason == "wrong password"
    assert not exchange.succeeded


def test_scramp_client_plus_with_tls_server_end_point() -> None:
    client = ScramClient([SCRAM_PLUS], "alice", PASSWORD, ("tls-server-end-point", CB_DATA))
    exchange = ScramExchange(VERIFIER, SCRAM_PLUS, CB_DATA, plus_offered=True)
    first = client.get_client_first()
    assert first.startswith("p=tls-server-end-point,,")
    server_first = exchange.client_first(first.encode())
    assert server_first is not None
    client.set_server_first(server_first.decode())
    final = client.get_client_final()
    expected_c = b64(b"p=tls-server-end-point,," + CB_DATA)
    assert final.startswith(f"c={expected_c},")
    server_final = exchange.client_final(final.encode())
    assert server_final is not None
    client.set_server_final(server_final.decode())
    assert exchange.succeeded


def test_scramp_client_plus_with_other_certificate() -> None:
    client = ScramClient([SCRAM_PLUS], "alice", PASSWORD, ("tls-server-end-point", b"x" * 32))
    exchange = ScramExchange(VERIFIER, SCRAM_PLUS, CB_DATA, plus_offered=True)
    server_first = exchange.client_first(client.get_client_first().encode())
    assert server_first is not None
    client.set_server_first(server_first.decode())
    assert exchange.client_final(client.get_client_final().encode()) is None
    assert exchange.failed_reason == "channel binding mismatch"


def test_downgrade_detected_when_plus_was_offered() -> None:
    # A client that supports binding ('y') but was shown no -PLUS mechanism: someone
    # stripped it from the list, since we offered it.
    client = ScramClient([SCRAM], "alice", PASSWORD, ("tls-server-end-point", CB_DATA))
    first = client.get_client_first()
    assert first.startswith("y,,")
    exchange = ScramExchange(VERIFIER, SCRAM, CB_DATA, plus_offered=True)
    assert exchange.client_first(first.encode()) is None
    assert exchange.failed_reason == "channel binding downgrade detected"


def test_y_flag_accepted_when_plus_was_not_offered() -> None:
    client = ScramClient([SCRAM], "alice", PASSWORD, ("tls-server-end-point", CB_DATA))
    exchange = ScramExchange(VERIFIER, SCRAM, None, plus_offered=False)
    server_first = exchange.client_first(client.get_client_first().encode())
    assert server_first is not None
    client.set_server_first(server_first.decode())
    final = client.get_client_final()
    assert final.startswith("c=eSws,")  # base64("y,,")
    server_final = exchange.client_final(final.encode())
    assert server_final is not None
    client.set_server_final(server_final.decode())
    assert exchange.succeeded


# --- the exchange: hand-written libpq-style client -------------------------------------


def test_empty_user_name_like_libpq() -> None:
    client = HandClient(PASSWORD)
    assert client.first() == f"n,,n=,r={CLIENT_NONCE}".encode()
    exchange = ScramExchange(VERIFIER, SCRAM, None)
    server_first = exchange.client_first(client.first())
    assert server_first is not None
    attrs = dict(item.split("=", 1) for item in server_first.decode().split(","))
    assert attrs["r"].startswith(CLIENT_NONCE)
    assert len(attrs["r"]) > len(CLIENT_NONCE) + 16  # plus a random server part
    assert base64.b64decode(attrs["s"]) == SALT
    assert attrs["i"] == "4096"
    server_final = exchange.client_final(client.final(server_first))
    assert server_final is not None
    assert client.check_server_final(server_final)
    assert exchange.succeeded


def test_server_nonce_is_fresh_per_exchange() -> None:
    firsts = {ScramExchange(VERIFIER, SCRAM, None).client_first(b"n,,n=,r=abc") for _ in range(5)}
    assert len(firsts) == 5


def test_hand_client_wrong_password() -> None:
    exchange = ScramExchange(VERIFIER, SCRAM, None)
    assert run(exchange, HandClient("not it")) is None
    assert exchange.failed_reason == "wrong password"


def test_tampered_nonce() -> None:
    client = HandClient(PASSWORD)
    exchange = ScramExchange(VERIFIER, SCRAM, None)
    server_first = exchange.client_first(client.first())
    assert server_first is not None
    # A correctly signed final message, but for a different (e.g. replayed) server nonce.
    final = client.final(server_first, nonce=CLIENT_NONCE + "AAAAAAAAAAAAAAAAAAAAAAAA")
    assert exchange.client_final(final) is None
    assert exchange.failed_reason == "nonce mismatch"
    assert not exchange.succeeded


def test_tampered_channel_binding_header() -> None:
    # The client claims 'n' in client-first but sends c= for 'y' in client-final.
    client = HandClient(PASSWORD)
    exchange = ScramExchange(VERIFIER, SCRAM, None)
    server_first = exchange.client_first(client.first())
    assert server_first is not None
    client.gs2_header = "y,,"
    assert exchange.client_final(client.final(server_first)) is None
    assert exchange.failed_reason == "channel binding mismatch"


def test_plus_hand_client_computes_c_from_certificate_hash() -> None:
    gs2 = "p=tls-server-end-point,,"
    client = HandClient(PASSWORD, gs2_header=gs2, cb_data=CB_DATA)
    exchange = ScramExchange(VERIFIER, SCRAM_PLUS, CB_DATA, plus_offered=True)
    server_first = exchange.client_first(client.first())
    assert server_first is not None
    final = client.final(server_first)
    assert final.startswith(b"c=" + b64(gs2.encode() + CB_DATA).encode() + b",")
    server_final = exchange.client_final(final)
    assert server_final is not None
    assert client.check_server_final(server_final)
    assert exchange.succeeded


def test_plus_hand_client_with_tampered_binding_data() -> None:
    gs2 = "p=tls-server-end-point,,"
    client = HandClient(PASSWORD, gs2_header=gs2, cb_data=CB_DATA[:-1] + b"\x00")
    exchange = ScramExchange(VERIFIER, SCRAM_PLUS, CB_DATA, plus_offered=True)
    assert run(exchange, client) is None
    assert exchange.failed_reason == "channel binding mismatch"


def test_plus_without_binding_data_in_final() -> None:
    # Right header, but c= carries only the header (as for plain SCRAM).
    gs2 = "p=tls-server-end-point,,"
    client = HandClient(PASSWORD, gs2_header=gs2, cb_data=b"")
    exchange = ScramExchange(VERIFIER, SCRAM_PLUS, CB_DATA, plus_offered=True)
    assert run(exchange, client) is None
    assert exchange.failed_reason == "channel binding mismatch"


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="unsupported mechanism"):
        ScramExchange(VERIFIER, "SCRAM-SHA-1", None)
    with pytest.raises(ValueError, match="channel binding"):
        ScramExchange(VERIFIER, SCRAM_PLUS, None)


# --- malformed messages never raise --------------------------------------------------


@pytest.mark.parametrize(
    ("mechanism", "message", "reason"),
    [
        (SCRAM, b"\xff\xfe", "not UTF-8"),
        (SCRAM, b"", "malformed client-first"),
        (SCRAM, b"n", "malformed client-first"),
        (SCRAM, b"n,,", "malformed client-first-bare"),
        (SCRAM, b"n,,n=", "malformed client-first-bare"),
        (SCRAM, b"n,,r=abc,n=", "malformed client-first-bare"),
        (SCRAM, b"n,a=bob,n=,r=abc", "authorization identity"),
        (SCRAM, b"x,,n=,r=abc", "channel binding requested"),
        (SCRAM, b"p=tls-server-end-point,,n=,r=abc", "channel binding requested"),
        (SCRAM, b"n,,n=,r=", "invalid client nonce"),
        (SCRAM, b"n,,n=,r=a b", "invalid client nonce"),
        (SCRAM, "n,,n=,r=é".encode(), "invalid client nonce"),
        (SCRAM, b"n,,n=,r=a\x7f", "invalid client nonce"),
        (SCRAM_PLUS, b"n,,n=,r=abc", "requires tls-server-end-point"),
        (SCRAM_PLUS, b"y,,n=,r=abc", "requires tls-server-end-point"),
        (SCRAM_PLUS, b"p=tls-unique,,n=,r=abc", "requires tls-server-end-point"),
    ],
)
def test_malformed_client_first(mechanism: str, message: bytes, reason: str) -> None:
    exchange = ScramExchange(VERIFIER, mechanism, CB_DATA)
    assert exchange.client_first(message) is None
    assert exchange.failed_reason is not None
    assert reason in exchange.failed_reason
    assert not exchange.succeeded
    # And a final message after a failed first is refused, not processed.
    assert exchange.client_final(b"c=biws,r=abc,p=AAAA") is None


def started() -> tuple[ScramExchange, str]:
    exchange = ScramExchange(VERIFIER, SCRAM, None)
    server_first = exchange.client_first(b"n,,n=,r=abc")
    assert server_first is not None
    nonce = server_first.decode().split(",")[0][2:]
    return exchange, nonce


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("\udcff", "not UTF-8"),
        ("", "malformed client-final"),
        ("c=biws", "malformed client-final"),
        ("p=AAAA", "malformed client-final"),
        ("c=biws,p=AAAA", "malformed client-final"),
        ("c=eSws,r={nonce},p=AAAA", "channel binding mismatch"),
        ("c=biws,r=abc,p=AAAA", "nonce mismatch"),
        ("c=biws,r={nonce}x,p=AAAA", "nonce mismatch"),
        ("c=biws,r={nonce},p=!!!!", "not base64"),
        ("c=biws,r={nonce},p=", "wrong length"),
        ("c=biws,r={nonce},p=AAAA", "wrong length"),
        ("c=biws,r={nonce},p=" + b64(b"\x00" * 33), "wrong length"),
        ("c=biws,r={nonce},p=" + b64(b"\x00" * 32), "wrong password"),
    ],
)
def test_malformed_client_final(template: str, reason: str) -> None:
    exchange, nonce = started()
    message = template.replace("{nonce}", nonce).encode("utf-8", "surrogateescape")
    assert exchange.client_final(message) is None
    assert exchange.failed_reason is not None
    assert reason in exchange.failed_reason
    assert not exchange.succeeded


def test_client_final_before_client_first() -> None:
    exchange = ScramExchange(VERIFIER, SCRAM, None)
    assert exchange.client_final(b"c=biws,r=abc,p=AAAA") is None
    assert exchange.failed_reason == "client-final before client-first"


@settings(max_examples=100, deadline=None, database=None)
@given(st.binary(max_size=80), st.binary(max_size=120), st.booleans())
def test_random_messages_never_raise(first: bytes, final: bytes, plus: bool) -> None:
    exchange = ScramExchange(VERIFIER, SCRAM_PLUS if plus else SCRAM, CB_DATA, plus_offered=True)
    reply = exchange.client_first(first)
    assert (reply is None) == (exchange.failed_reason is not None)
    assert exchange.client_final(final) is None
    assert not exchange.succeeded


@settings(max_examples=100, deadline=None, database=None)
@given(st.text(max_size=60))
def test_random_final_after_valid_first_never_raises(final: str) -> None:
    exchange, nonce = started()
    assert exchange.client_final(final.replace("N", nonce).encode("utf-8", "replace")) is None
    assert exchange.failed_reason is not None


# --- tls-server-end-point ---------------------------------------------------------------


def self_signed(
    key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey,
    algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None,
) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tenantgate test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("algorithm", "digest"),
    [
        (hashes.SHA256(), "sha256"),
        (hashes.SHA384(), "sha384"),
        (hashes.SHA512(), "sha512"),
    ],
)
def test_tls_server_end_point_uses_signature_hash(
    algorithm: hashes.SHA256 | hashes.SHA384 | hashes.SHA512, digest: str
) -> None:
    der = self_signed(ec.generate_private_key(ec.SECP256R1()), algorithm)
    assert tls_server_end_point(der) == hashlib.new(digest, der).digest()


def test_tls_server_end_point_without_signature_hash_uses_sha256() -> None:
    der = self_signed(ed25519.Ed25519PrivateKey.generate(), None)
    assert tls_server_end_point(der) == hashlib.sha256(der).digest()


def test_plus_exchange_with_real_certificate_binding() -> None:
    der = self_signed(ec.generate_private_key(ec.SECP256R1()), hashes.SHA384())
    client_cb = hashlib.sha384(der).digest()  # what a client computes from the peer cert
    client = ScramClient([SCRAM_PLUS], "alice", PASSWORD, ("tls-server-end-point", client_cb))
    exchange = ScramExchange(VERIFIER, SCRAM_PLUS, tls_server_end_point(der), plus_offered=True)
    server_first = exchange.client_first(client.get_client_first().encode())
    assert server_first is not None
    client.set_server_first(server_first.decode())
    server_final = exchange.client_final(client.get_client_final().encode())
    assert server_final is not None
    client.set_server_final(server_final.decode())
    assert exchange.succeeded
