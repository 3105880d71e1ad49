"""The policy file: YAML in, an immutable validated :class:`Policy` out.

Owns parsing (safe loader), ``${VAR}`` expansion from the environment, the typed
model (pydantic, frozen, unknown keys forbidden) and error messages that name
the file, the key path and the problem.  Nothing here does I/O except reading
the file in :func:`load_policy`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tenantgate.errors import ConfigError

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_IDENT = r"[A-Za-z_][A-Za-z0-9_$]*"
_TABLE_NAME = re.compile(rf"^{_IDENT}(\.{_IDENT})?$")
_COLUMN_NAME = re.compile(rf"^{_IDENT}$")
# Tenant ids travel into SQL literals, setting values and metric labels: keep them tame.
_TENANT_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,62}$")
_SETTING_NAME = re.compile(rf"^{_IDENT}\.{_IDENT}$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


Port = Annotated[int, Field(ge=0, le=65535)]


class TlsConfig(_Model):
    cert: Path
    key: Path
    require: bool = False


class ListenConfig(_Model):
    host: str = "127.0.0.1"
    port: Port = 6432
    tls: TlsConfig | None = None


class MetricsConfig(_Model):
    host: str = "127.0.0.1"
    port: Port = 9187
    enabled: bool = True


class UpstreamConfig(_Model):
    host: str = "127.0.0.1"
    port: Port = 5432
    database: str
    user: str
    password: str | None = None
    sslmode: Literal["disable", "prefer", "require", "verify-full"] = "prefer"
    sslrootcert: Path | None = None
    connect_timeout_s: float = Field(default=5.0, gt=0)


class UserConfig(_Model):
    password: str = Field(min_length=1)

    @property
    def is_verifier(self) -> bool:
        return self.password.startswith("SCRAM-SHA-256$")


class TenantLimits(_Model):
    max_connections: int | None = Field(default=None, ge=1)
    statement_timeout_ms: int | None = Field(default=None, ge=1)
    queries_per_second: float | None = Field(default=None, gt=0)
    idle_in_transaction_timeout_ms: int | None = Field(default=None, ge=1)


class TenantConfig(_Model):
    users: dict[str, UserConfig] = Field(min_length=1)
    limits: TenantLimits = TenantLimits()
    # Optional per-tenant upstream role (rls mode can then key policies on session_user).
    upstream_user: str | None = None
    upstream_password: str | None = None


class GlobalLimits(_Model):
    max_client_connections: int = Field(default=10000, ge=1)
    handshake_timeout_s: float = Field(default=10.0, gt=0)
    idle_client_timeout_s: float | None = Field(default=None, gt=0)
    shutdown_timeout_s: float = Field(default=30.0, ge=0)
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    rate_limit_max_delay_ms: int = Field(default=1000, ge=0)


class AuditConfig(_Model):
    statements: bool = False
    output: str = "stdout"  # "stdout" or a file path
    queue_size: int = Field(default=10000, ge=1)


class LoggingConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"


class Policy(_Model):
    """The whole validated policy file."""

    listen: ListenConfig = ListenConfig()
    metrics: MetricsConfig = MetricsConfig()
    upstream: UpstreamConfig
    tenant_setting: str = "app.tenant_id"
    mode: Literal["enforce", "rls", "both"] = "both"
    tables: dict[str, str] = Field(default_factory=dict)
    shared_tables: tuple[str, ...] = ()
    unknown_tables: Literal["reject", "allow"] = "reject"
    allowed_functions: tuple[str, ...] = ()
    denied_functions: tuple[str, ...] = ()
    dry_run: bool = False
    tenants: dict[str, TenantConfig] = Field(min_length=1)
    limits: GlobalLimits = GlobalLimits()
    audit: AuditConfig = AuditConfig()
    logging: LoggingConfig = LoggingConfig()

    @field_validator("tenant_setting")
    @classmethod
    def _setting_is_custom(cls, value: str) -> str:
        if not _SETTING_NAME.match(value):
            raise ValueError("must be a custom setting name like 'app.tenant_id'")
        return value

    @field_validator("tables")
    @classmethod
    def _tables_are_names(cls, value: dict[str, str]) -> dict[str, str]:
        if len({t.lower() for t in value}) != len(value):
            raise ValueError("table names differ only in case (names are case-insensitive)")
        for table, column in value.items():
            if not _TABLE_NAME.match(table):
                raise ValueError(f"{table!r} is not a table name (schema.table or table)")
            if not _COLUMN_NAME.match(column):
                raise ValueError(f"{column!r} (tenant column of {table}) is not a column name")
        return {table.lower(): column.lower() for table, column in value.items()}

    @field_validator("shared_tables")
    @classmethod
    def _shared_are_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for table in value:
            if not _TABLE_NAME.match(table):
                raise ValueError(f"{table!r} is not a table name")
        return tuple(t.lower() for t in value)

    @field_validator("tenants")
    @classmethod
    def _tenant_ids(cls, value: dict[str, TenantConfig]) -> dict[str, TenantConfig]:
        for tenant in value:
            if not _TENANT_ID.match(str(tenant)):
                raise ValueError(
                    f"tenant id {tenant!r} must be 1-63 characters of letters, digits, _ . : @ -"
                )
        return value

    @model_validator(mode="after")
    def _cross_checks(self) -> Policy:
        seen: dict[str, str] = {}
        for tenant_id, tenant in self.tenants.items():
            for user in tenant.users:
                if user in seen:
                    raise ValueError(
                        f"user {user!r} is listed under tenants {seen[user]!r} and {tenant_id!r}"
                    )
                seen[user] = tenant_id
        overlap = set(self.tables) & set(self.shared_tables)
        if overlap:
            raise ValueError(f"tables listed as both scoped and shared: {sorted(overlap)}")
        return self

    # --- derived lookups ---------------------------------------------------------

    def find_user(self, user: str) -> tuple[str, UserConfig] | None:
        """The (tenant id, user entry) of a login name, or None."""
        for tenant_id, tenant in self.tenants.items():
            entry = tenant.users.get(user)
            if entry is not None:
                return tenant_id, entry
        return None

    @property
    def enforces_predicates(self) -> bool:
        return self.mode in ("enforce", "both")

    @property
    def injects_tenant(self) -> bool:
        return self.mode in ("rls", "both")

    def plaintext_users(self) -> list[str]:
        return [u for t in self.tenants.values() for u, e in t.users.items() if not e.is_verifier]


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader for policy files.

    Mapping keys keep the text they were written with (YAML would turn the
    tenant key ``0123`` into 83 and ``yes`` into True), and duplicate keys are
    an error (YAML would silently keep the last one).
    """


def _mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    result: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        if isinstance(key_node, yaml.ScalarNode):
            key: Any = key_node.value
        else:
            key = loader.construct_object(key_node, deep=True)
        if key in result:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
    return result


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def _expand_env(node: Any, path: tuple[str | int, ...], env: Mapping[str, str]) -> Any:
    if isinstance(node, str):

        def replace(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in env:
                raise ConfigError(f"{_dotted(path)}: environment variable {name} is not set")
            return env[name]

        return _ENV_REF.sub(replace, node)
    if isinstance(node, dict):
        return {k: _expand_env(v, (*path, str(k)), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, (*path, i), env) for i, v in enumerate(node)]
    return node


def _dotted(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path) or "<top level>"


def _format_validation(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = tuple(
            p for p in item["loc"] if not (isinstance(p, str) and p.startswith("function-"))
        )
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{_dotted(loc)}: {message}")
    return "; ".join(lines)


def parse_policy(
    text: str, source: str = "<policy>", env: Mapping[str, str] | None = None
) -> Policy:
    """Validate policy YAML text; raise :class:`ConfigError` naming ``source`` on any problem."""
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: <top level>: must be a mapping of keys")
    try:
        expanded = _expand_env(raw, (), os.environ if env is None else env)
        return Policy.model_validate(expanded)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_validation(exc)}") from None


def load_policy(path: str | Path, env: Mapping[str, str] | None = None) -> Policy:
    """Read and validate the policy file at ``path``."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    policy = parse_policy(text, str(path), env)
    return _resolve_paths(policy, Path(path).parent)


def _resolve_paths(policy: Policy, base: Path) -> Policy:
    """TLS file paths in the policy are relative to the policy file."""
    updates: dict[str, Any] = {}
    tls = policy.listen.tls
    if tls is not None:
        tls = tls.model_copy(update={"cert": base / tls.cert, "key": base / tls.key})
        updates["listen"] = policy.listen.model_copy(update={"tls": tls})
    if policy.upstream.sslrootcert is not None:
        updates["upstream"] = policy.upstream.model_copy(
            update={"sslrootcert": base / policy.upstream.sslrootcert}
        )
    return policy.model_copy(update=updates) if updates else policy
