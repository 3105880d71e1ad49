"""The exception hierarchy and every SQLSTATE-carrying error the proxy sends.

One root type (:class:`TenantgateError`).  Protocol errors are split like
h11's: :class:`LocalProtocolError` means *we* were asked to produce something
invalid, :class:`RemoteProtocolError` means the peer sent something invalid.
The builders at the bottom are the only place that decides which SQLSTATE,
severity, message and hint a client sees, so wording stays consistent.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class TenantgateError(Exception):
    """Root of every exception tenantgate raises on purpose."""


class ConfigError(TenantgateError):
    """The policy file is missing, malformed or invalid.

    ``str(err)`` names the file, the key path and the problem.
    """


class ProtocolError(TenantgateError):
    """Something about the wire protocol is wrong."""


class LocalProtocolError(ProtocolError):
    """We were asked to encode something the protocol cannot carry."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol (or our limits)."""


class UpstreamError(TenantgateError):
    """The upstream server could not be reached or refused us."""


class ClusterError(TenantgateError):
    """A PostgreSQL cluster could not be found, created, started, queried or stopped."""


class AuthenticationFailed(TenantgateError):
    """A client failed to authenticate; ``reason`` is a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PgError(TenantgateError):
    """An error or notice to send to a client as ErrorResponse/NoticeResponse.

    Carries exactly the fields a client sees.  ``fatal`` errors end the session.
    """

    sqlstate: str
    message: str
    severity: str = "ERROR"
    hint: str | None = None
    detail: str | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __str__(self) -> str:
        return f"{self.severity} {self.sqlstate}: {self.message}"

    @property
    def fatal(self) -> bool:
        return self.severity in ("FATAL", "PANIC")

    def fields(self) -> list[tuple[str, str]]:
        """The (field code, value) pairs of the ErrorResponse, in wire order."""
        out = [
            ("S", self.severity),
            ("V", self.severity),
            ("C", self.sqlstate),
            ("M", self.message),
        ]
        if self.detail is not None:
            out.append(("D", self.detail))
        if self.hint is not None:
            out.append(("H", self.hint))
        out.extend(self.extra)
        return out


# --- builders: the single source of client-visible error wording -------------------

INSUFFICIENT_PRIVILEGE = "42501"


def rejected(rule: str, message: str, hint: str) -> PgError:
    """A statement refused by the policy (contract: 42501, ``tenantgate:`` prefix, HINT)."""
    return PgError(INSUFFICIENT_PRIVILEGE, f"tenantgate: {rule}: {message}", hint=hint)


def auth_failed(user: str) -> PgError:
    """Same text for unknown user and wrong password, so neither is revealed."""
    return PgError("28P01", f'password authentication failed for user "{user}"', "FATAL")


def too_many_connections_for_tenant() -> PgError:
    return PgError(
        "53300",
        "tenantgate: too many connections for this tenant",
        "FATAL",
        hint="Close idle connections or raise tenants.<id>.limits.max_connections.",
    )


def too_many_clients() -> PgError:
    return PgError(
        "53300",
        "tenantgate: too many client connections",
        "FATAL",
        hint="Raise limits.max_client_connections or use a client-side pool.",
    )


def rate_limited(rate: float) -> PgError:
    return PgError(
        "53400",
        f"tenantgate: rate limit exceeded: this tenant may run {rate:g} statements per second",
        hint="Slow down or raise tenants.<id>.limits.queries_per_second.",
    )


def upstream_unavailable(detail: str) -> PgError:
    return PgError(
        "08006",
        "tenantgate: could not connect to the upstream database",
        "FATAL",
        detail=detail,
        hint="Check that PostgreSQL is running and upstream.* in the policy file.",
    )


def upstream_lost() -> PgError:
    return PgError("08006", "tenantgate: lost the connection to the upstream database", "FATAL")


def shutting_down() -> PgError:
    return PgError(
        "57P01", "tenantgate: terminating connection because the proxy is shutting down", "FATAL"
    )


def tenant_removed() -> PgError:
    return PgError(
        "57P01",
        "tenantgate: terminating connection because its tenant or user was removed from the policy",
        "FATAL",
    )


def protocol_violation(message: str) -> PgError:
    return PgError("08P01", f"tenantgate: {message}", "FATAL")


def unsupported_message(kind: str) -> PgError:
    return PgError(
        "08P01",
        f"tenantgate: {kind} is not supported",
        "FATAL",
        hint="tenantgate accepts the simple and extended query protocols only.",
    )


def database_refused(database: str) -> PgError:
    return PgError("3D000", f'database "{database}" does not exist', "FATAL")


def startup_refused(message: str, sqlstate: str = "08P01") -> PgError:
    return PgError(sqlstate, f"tenantgate: {message}", "FATAL")


def timeout(message: str, sqlstate: str = "08P01") -> PgError:
    return PgError(sqlstate, f"tenantgate: {message}", "FATAL")


def internal_error() -> PgError:
    """What a client sees instead of a traceback."""
    return PgError("XX000", "tenantgate: internal error; the session was closed", "FATAL")


def idle_client_timeout() -> PgError:
    return PgError(
        "57P05",
        "tenantgate: terminating connection due to idle client timeout",
        "FATAL",
        hint="Raise limits.idle_client_timeout_s or close idle connections in the client pool.",
    )
