"""The proxy as an upstream client: authentication methods and ``sslmode``.

One extra module-scoped cluster (TLS on, a CA-signed server certificate for
127.0.0.1/localhost, a pg_hba.conf with md5, scram-sha-256, hostssl-only and
trust roles) is the upstream of real proxies; the session cluster (TLS off)
serves the "server does not support TLS" case.  Whether a session runs over
TLS is read on the superuser side from ``pg_stat_ssl`` joined with
``pg_stat_activity`` on the application_name the client sent (the proxy
forwards it).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from proxy_helpers import RawClient, ServerError

from support.db import TenantDb
from support.proxy import RunningProxy
from tenantgate.cluster import Cluster, TemporaryCluster
from tenantgate.config import Policy, parse_policy

pytestmark = pytest.mark.postgres

MD5_ROLE, MD5_PW = "tg_md5", "md5-Secret-pw-1"
SCRAM_ROLE, SCRAM_PW = "tg_scram", "scram-Secret-pw-2"
SSL_ROLE, SSL_PW = "tg_sslonly", "ssl-Secret-pw-3"
TRUST_ROLE = "tg_trust"
ACME_ROLE, ACME_PW = "tg_acme_role", "acme-role-Secret-pw-4"
DATABASE = "postgres"

HBA = f"""\
# written by test_upstream_auth
local   all  all                           trust
hostssl all  {SSL_ROLE}    127.0.0.1/32    scram-sha-256
host    all  {SSL_ROLE}    127.0.0.1/32    reject
host    all  {MD5_ROLE}    127.0.0.1/32    md5
host    all  {SCRAM_ROLE}  127.0.0.1/32    scram-sha-256
host    all  {TRUST_ROLE}  127.0.0.1/32    trust
host    all  all           127.0.0.1/32    scram-sha-256
"""


# --- certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    cert_pem: bytes
    key_pem: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _make_pki(directory: Path) -> Pki:
    ca_key, ca_cert = _make_ca("tenantgate test CA")
    _, other_cert = _make_ca("tenantgate unrelated CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, other_path = directory / "ca.crt", directory / "other-ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    other_path.write_bytes(other_cert.public_bytes(serialization.Encoding.PEM))
    return Pki(
        ca=ca_path,
        other_ca=other_path,
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


# --- the TLS cluster ------------------------------------------------------------------


class _TlsCluster(TemporaryCluster):
    """A temporary cluster that also gets a server certificate and our pg_hba.conf.

    Both are written into the data directory (after initdb, before the server
    starts), owned by the server's OS user; the key is mode 0600 as PostgreSQL
    requires.
    """

    def __init__(self, pki: Pki) -> None:
        super().__init__(
            settings={
                "ssl": True,
                "ssl_cert_file": "server.crt",
                "ssl_key_file": "server.key",
            }
        )
        self._pki = pki

    def _write_conf(self) -> None:
        super()._write_conf()
        run_as = self._run_as
        assert run_as is not None
        files = {
            "server.crt": (self._pki.cert_pem, 0o644),
            "server.key": (self._pki.key_pem, 0o600),
            "pg_hba.conf": (HBA.encode(), 0o600),
        }
        for name, (content, mode) in files.items():
            path = self.data_dir / name
            path.write_bytes(content)
            path.chmod(mode)
            run_as.chown(path)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return _make_pki(tmp_path_factory.mktemp("upstream-pki"))


@pytest.fixture(scope="module")
def tls_pg(pki: Pki) -> Iterator[TemporaryCluster]:
    cluster = _TlsCluster(pki)
    cluster.start()
    try:
        with psycopg.connect(cluster.dsn, autocommit=True) as conn:
            conn.execute("SET password_encryption = 'md5'")
            conn.execute(f"CREATE ROLE {MD5_ROLE} LOGIN PASSWORD '{MD5_PW}'")
            conn.execute("SET password_encryption = 'scram-sha-256'")
            conn.execute(f"CREATE ROLE {SCRAM_ROLE} LOGIN PASSWORD '{SCRAM_PW}'")
            conn.execute(f"CREATE ROLE {SSL_ROLE} LOGIN PASSWORD '{SSL_PW}'")
            conn.execute(f"CREATE ROLE {TRUST_ROLE} LOGIN")
            conn.execute(f"CREATE ROLE {ACME_ROLE} LOGIN PASSWORD '{ACME_PW}'")
            stored = conn.execute(
                "SELECT rolname, left(rolpassword, 3) FROM pg_authid WHERE rolname = ANY(%s)",
                ([MD5_ROLE, SCRAM_ROLE],),
            ).fetchall()
        assert dict(stored) == {MD5_ROLE: "md5", SCRAM_ROLE: "SCR"}
        yield cluster
    finally:
        cluster.stop()


# --- helpers --------------------------------------------------------------------------


def _policy(tenant_db: TenantDb, cluster: Cluster, **upstream: Any) -> Policy:
    """An enforce-mode policy with no tables (``SELECT 1`` passes) whose upstream is ``cluster``."""
    tenants = upstream.pop("tenants", None)
    data = tenant_db.policy_dict("enforce")
    data["tables"] = {}
    data["shared_tables"] = []
    data["upstream"] = {
        "host": "127.0.0.1",
        "port": cluster.port,
        "database": DATABASE,
        "sslmode": "disable",
        "connect_timeout_s": 5,
        **upstream,
    }
    if tenants:
        for tenant, extra in tenants.items():
            data["tenants"][tenant].update(extra)
    return parse_policy(yaml.safe_dump(data, sort_keys=False), "<upstream auth test>", env={})


def _sockets_to(port: int) -> int:
    """How many TCP sockets of this process are connected to ``port`` (Linux /proc)."""
    inodes: set[str] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[2].rsplit(":", 1)[1], 16) == port and fields[9] in inodes:
                count += 1
    return count


@contextmanager
def _running(policy: Policy) -> Iterator[RunningProxy]:
    """A proxy, stopped only once its upstream connections are really closed.

    Closing a TLS upstream connection finishes asynchronously (close_notify);
    stopping the proxy's loop before that leaves an unclosed transport behind.
    """
    with RunningProxy(policy) as proxy:
        yield proxy
        deadline = time.monotonic() + 10
        while _sockets_to(policy.upstream.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _sockets_to(policy.upstream.port) == 0, "the proxy kept an upstream socket open"


def _connect(
    proxy: RunningProxy, tenant_db: TenantDb, tenant: str, app: str
) -> psycopg.Connection[Any]:
    user = tenant_db.user(tenant)
    return psycopg.connect(
        proxy.dsn(user.name, user.password, application_name=app, connect_timeout="10"),
        autocommit=True,
    )


def _ssl_of(cluster: Cluster, app: str) -> bool:
    """Whether the upstream backend serving application_name ``app`` runs over TLS."""
    with psycopg.connect(cluster.dsn, autocommit=True, sslmode="disable") as conn:
        row = conn.execute(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
            "WHERE a.application_name = %s",
            (app,),
        ).fetchall()
    assert len(row) == 1, f"expected one backend named {app!r}, got {row!r}"
    return bool(row[0][0])


def _session(
    proxy: RunningProxy, tenant_db: TenantDb, cluster: Cluster, tenant: str = "acme"
) -> tuple[str, bool]:
    """Through the proxy: (current_user, whether the upstream leg is TLS)."""
    app = "tg-" + uuid.uuid4().hex[:12]
    with _connect(proxy, tenant_db, tenant, app) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        user_row = conn.execute("SELECT current_user").fetchone()
        assert user_row is not None
        return str(user_row[0]), _ssl_of(cluster, app)


def _login_error(
    proxy: RunningProxy, tenant_db: TenantDb, database: str = DATABASE
) -> dict[str, str]:
    """The ErrorResponse fields a client gets when the proxy cannot reach upstream."""
    user = tenant_db.user("acme")
    with RawClient(proxy.host, proxy.port) as client, pytest.raises(ServerError) as caught:
        client.login(user.name, user.password, database=database)
    return caught.value.fields


# --- authentication methods -----------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "password"),
    [(MD5_ROLE, MD5_PW), (SCRAM_ROLE, SCRAM_PW), (TRUST_ROLE, None)],
    ids=["md5", "scram-sha-256", "trust"],
)
def test_auth_method_works(
    tenant_db: TenantDb, tls_pg: TemporaryCluster, role: str, password: str | None
) -> None:
    with _running(_policy(tenant_db, tls_pg, user=role, password=password)) as proxy:
        current, ssl_used = _session(proxy, tenant_db, tls_pg)
    assert current == role
    assert ssl_used is False


@pytest.mark.parametrize("role", [MD5_ROLE, SCRAM_ROLE], ids=["md5", "scram-sha-256"])
def test_wrong_upstream_password_is_fatal_08006_without_the_password(
    tenant_db: TenantDb, tls_pg: TemporaryCluster, role: str
) -> None:
    wrong = "Wrong-Upstream-pw-" + uuid.uuid4().hex[:8]
    with _running(_policy(tenant_db, tls_pg, user=role, password=wrong)) as proxy:
        fields = _login_error(proxy, tenant_db)
    assert fields["S"] == "FATAL"
    assert fields["C"] == "08006"
    assert "password authentication failed" in fields.get("D", ""), fields
    assert role in fields.get("D", ""), fields
    for value in fields.values():
        assert wrong not in value
        assert MD5_PW not in value
        assert SCRAM_PW not in value


def test_missing_upstream_password_is_fatal_08006(
    tenant_db: TenantDb, tls_pg: TemporaryCluster
) -> None:
    with _running(_policy(tenant_db, tls_pg, user=SCRAM_ROLE)) as proxy:
        fields = _login_error(proxy, tenant_db)
    assert fields["C"] == "08006"
    assert "password is not set" in fields.get("D", "")


# --- sslmode --------------------------------------------------------------------------


def test_require_uses_tls(tenant_db: TenantDb, tls_pg: TemporaryCluster) -> None:
    policy = _policy(tenant_db, tls_pg, user=SCRAM_ROLE, password=SCRAM_PW, sslmode="require")
    with _running(policy) as proxy:
        assert _session(proxy, tenant_db, tls_pg) == (SCRAM_ROLE, True)


def test_hostssl_only_role_over_require(tenant_db: TenantDb, tls_pg: TemporaryCluster) -> None:
    secure = _policy(tenant_db, tls_pg, user=SSL_ROLE, password=SSL_PW, sslmode="require")
    with _running(secure) as proxy:
        assert _session(proxy, tenant_db, tls_pg) == (SSL_ROLE, True)


def test_hostssl_only_role_refused_without_tls(
    tenant_db: TenantDb, tls_pg: TemporaryCluster
) -> None:
    plain = _policy(tenant_db, tls_pg, user=SSL_ROLE, password=SSL_PW, sslmode="disable")
    with _running(plain) as proxy:
        fields = _login_error(proxy, tenant_db)
    assert fields["C"] == "08006"
    assert "pg_hba.conf" in fields.get("D", ""), fields
    assert SSL_PW not in "".join(fields.values())


def test_verify_full_with_the_right_ca(
    tenant_db: TenantDb, tls_pg: TemporaryCluster, pki: Pki
) -> None:
    policy = _policy(
        tenant_db,
        tls_pg,
        user=SSL_ROLE,
        password=SSL_PW,
        sslmode="verify-full",
        sslrootcert=str(pki.ca),
    )
    with _running(policy) as proxy:
        assert _session(proxy, tenant_db, tls_pg) == (SSL_ROLE, True)


def test_verify_full_with_a_wrong_ca_fails(
    tenant_db: TenantDb, tls_pg: TemporaryCluster, pki: Pki
) -> None:
    policy = _policy(
        tenant_db,
        tls_pg,
        user=SSL_ROLE,
        password=SSL_PW,
        sslmode="verify-full",
        sslrootcert=str(pki.other_ca),
    )
    with _running(policy) as proxy:
        fields = _login_error(proxy, tenant_db)
    assert fields["S"] == "FATAL"
    assert fields["C"] == "08006"
    assert "certificate verify failed" in fields.get("D", ""), fields
    assert SSL_PW not in "".join(fields.values())


def test_prefer_uses_tls_when_available(tenant_db: TenantDb, tls_pg: TemporaryCluster) -> None:
    policy = _policy(tenant_db, tls_pg, user=SCRAM_ROLE, password=SCRAM_PW, sslmode="prefer")
    with _running(policy) as proxy:
        assert _session(proxy, tenant_db, tls_pg) == (SCRAM_ROLE, True)


def test_prefer_falls_back_to_plaintext(tenant_db: TenantDb, pg: Cluster) -> None:
    policy = tenant_db.policy("enforce", upstream={"sslmode": "prefer"})
    with _running(policy) as proxy:
        app = "tg-" + uuid.uuid4().hex[:12]
        with _connect(proxy, tenant_db, "acme", app) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert _ssl_of(pg, app) is False


def test_disable_does_not_use_tls(tenant_db: TenantDb, tls_pg: TemporaryCluster) -> None:
    policy = _policy(tenant_db, tls_pg, user=SCRAM_ROLE, password=SCRAM_PW, sslmode="disable")
    with _running(policy) as proxy:
        assert _session(proxy, tenant_db, tls_pg) == (SCRAM_ROLE, False)


def test_require_against_a_server_without_tls_fails(tenant_db: TenantDb, pg: Cluster) -> None:
    policy = tenant_db.policy("enforce", upstream={"sslmode": "require"})
    with _running(policy) as proxy:
        fields = _login_error(proxy, tenant_db, tenant_db.database)
    assert fields["S"] == "FATAL"
    assert fields["C"] == "08006"
    assert "does not support TLS" in fields.get("D", ""), fields
    assert tenant_db.app_password not in "".join(fields.values())


# --- per-tenant upstream role ---------------------------------------------------------


def test_per_tenant_upstream_role(tenant_db: TenantDb, tls_pg: TemporaryCluster) -> None:
    policy = _policy(
        tenant_db,
        tls_pg,
        user=SCRAM_ROLE,
        password=SCRAM_PW,
        tenants={"acme": {"upstream_user": ACME_ROLE, "upstream_password": ACME_PW}},
    )
    with _running(policy) as proxy:
        assert _session(proxy, tenant_db, tls_pg, "acme")[0] == ACME_ROLE
        assert _session(proxy, tenant_db, tls_pg, "globex")[0] == SCRAM_ROLE
        app = "tg-" + uuid.uuid4().hex[:12]
        with _connect(proxy, tenant_db, "acme", app) as conn:
            row = conn.execute("SELECT session_user").fetchone()
        assert row == (ACME_ROLE,)
