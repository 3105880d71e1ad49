"""errors: the exception hierarchy, PgError wire fields and the client-visible builders."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from tenantgate import errors
from tenantgate.errors import (
    AuthenticationFailed,
    ConfigError,
    LocalProtocolError,
    PgError,
    ProtocolError,
    RemoteProtocolError,
    TenantgateError,
    UpstreamError,
)
from tenantgate.protocol.backend import ErrorResponse, decode_backend


@pytest.mark.parametrize(
    ("cls", "parent"),
    [
        (ConfigError, TenantgateError),
        (ProtocolError, TenantgateError),
        (LocalProtocolError, ProtocolError),
        (RemoteProtocolError, ProtocolError),
        (UpstreamError, TenantgateError),
        (AuthenticationFailed, TenantgateError),
        (PgError, TenantgateError),
        (TenantgateError, Exception),
    ],
)
def test_hierarchy(cls: type[Exception], parent: type[Exception]) -> None:
    assert issubclass(cls, parent)


def test_local_and_remote_protocol_errors_are_distinct() -> None:
    assert not issubclass(RemoteProtocolError, LocalProtocolError)
    assert not issubclass(LocalProtocolError, RemoteProtocolError)


def test_authentication_failed_reason() -> None:
    exc = AuthenticationFailed("wrong_password")
    assert exc.reason == "wrong_password"
    assert str(exc) == "wrong_password"


def test_pg_error_fields_order_full() -> None:
    error = PgError(
        "42501",
        "tenantgate: scope: nope",
        "ERROR",
        hint="add a predicate",
        detail="table orders",
        extra=(("P", "8"), ("W", "context")),
    )
    assert error.fields() == [
        ("S", "ERROR"),
        ("V", "ERROR"),
        ("C", "42501"),
        ("M", "tenantgate: scope: nope"),
        ("D", "table orders"),
        ("H", "add a predicate"),
        ("P", "8"),
        ("W", "context"),
    ]


def test_pg_error_fields_minimal() -> None:
    assert PgError("XX000", "m", "FATAL").fields() == [
        ("S", "FATAL"),
        ("V", "FATAL"),
        ("C", "XX000"),
        ("M", "m"),
    ]


def test_pg_error_defaults_str_fatal_and_frozen() -> None:
    error = PgError("22012", "division by zero")
    assert error.severity == "ERROR"
    assert (error.hint, error.detail, error.extra) == (None, None, ())
    assert str(error) == "ERROR 22012: division by zero"
    assert not error.fatal
    assert PgError("x", "y", "FATAL").fatal
    assert PgError("x", "y", "PANIC").fatal
    assert not PgError("x", "y", "WARNING").fatal
    with pytest.raises(dataclasses.FrozenInstanceError):
        error.message = "changed"  # type: ignore[misc]
    with pytest.raises(PgError):
        raise error


def test_rejected() -> None:
    error = errors.rejected("scope", "orders needs tenant_id = 'acme'", "Add WHERE tenant_id = ...")
    assert error.sqlstate == "42501"
    assert error.severity == "ERROR"
    assert not error.fatal  # the connection stays usable
    assert error.message == "tenantgate: scope: orders needs tenant_id = 'acme'"
    assert error.hint == "Add WHERE tenant_id = ..."
    assert ("H", "Add WHERE tenant_id = ...") in error.fields()


def test_auth_failed_same_text_for_every_reason() -> None:
    error = errors.auth_failed("acme_app")
    assert error.sqlstate == "28P01"
    assert error.fatal
    assert error.message == 'password authentication failed for user "acme_app"'
    # No hint or detail that could reveal whether the user exists.
    assert (error.hint, error.detail) == (None, None)
    assert errors.auth_failed("x").fields()[:3] == error.fields()[:3]


BUILDERS: list[tuple[Callable[[], PgError], str, str]] = [
    (errors.too_many_connections_for_tenant, "53300", "FATAL"),
    (errors.too_many_clients, "53300", "FATAL"),
    (lambda: errors.rate_limited(12.5), "53400", "ERROR"),
    (lambda: errors.upstream_unavailable("connection refused"), "08006", "FATAL"),
    (errors.upstream_lost, "08006", "FATAL"),
    (errors.shutting_down, "57P01", "FATAL"),
    (errors.tenant_removed, "57P01", "FATAL"),
    (lambda: errors.protocol_violation("bad message"), "08P01", "FATAL"),
    (lambda: errors.unsupported_message("FunctionCall"), "08P01", "FATAL"),
    (lambda: errors.startup_refused("replication is not allowed"), "08P01", "FATAL"),
    (lambda: errors.startup_refused("no", "28000"), "28000", "FATAL"),
    (lambda: errors.timeout("handshake timed out"), "08P01", "FATAL"),
    (lambda: errors.timeout("idle", "57P05"), "57P05", "FATAL"),
    (errors.internal_error, "XX000", "FATAL"),
]


@pytest.mark.parametrize(("build", "sqlstate", "severity"), BUILDERS)
def test_builders(build: Callable[[], PgError], sqlstate: str, severity: str) -> None:
    error = build()
    assert error.sqlstate == sqlstate
    assert error.severity == severity
    assert error.fatal == (severity == "FATAL")
    assert error.message.startswith("tenantgate: ")
    assert "Traceback" not in error.message


def test_builder_details() -> None:
    assert errors.rate_limited(12.5).message.endswith("may run 12.5 statements per second")
    unavailable = errors.upstream_unavailable("connection refused")
    assert unavailable.detail == "connection refused"
    assert unavailable.hint is not None
    assert errors.too_many_connections_for_tenant().hint is not None
    assert "FunctionCall" in errors.unsupported_message("FunctionCall").message
    assert errors.protocol_violation("bad").message == "tenantgate: bad"


def test_database_refused_mimics_postgres() -> None:
    error = errors.database_refused("other")
    assert (error.sqlstate, error.severity) == ("3D000", "FATAL")
    assert error.message == 'database "other" does not exist'


@pytest.mark.parametrize(
    "error",
    [
        errors.rejected("r", "m", "h"),
        errors.auth_failed("u"),
        errors.upstream_unavailable("d"),
        PgError("XX000", "é", extra=(("P", "1"),)),
    ],
    ids=str,
)
def test_builders_encode_as_error_response(error: PgError) -> None:
    data = ErrorResponse.from_error(error).encode()
    assert data[:1] == b"E"
    decoded = decode_backend(data[0], data[5:])
    assert isinstance(decoded, ErrorResponse)
    assert list(decoded.fields) == error.fields()
    assert decoded.sqlstate == error.sqlstate
