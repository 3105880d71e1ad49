"""config: parse_policy/load_policy — defaults, ${VAR}, validation messages, paths, examples."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from tenantgate.config import Policy, load_policy, parse_policy
from tenantgate.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
MINIMAL = """
upstream: {database: app, user: app_tenant}
tenants:
  acme: {users: {acme_app: {password: pw}}}
"""
FULL = """
listen: {host: 0.0.0.0, port: 7000}
metrics: {host: 127.0.0.1, port: 9999, enabled: false}
upstream:
  host: db.internal
  port: 5433
  database: app
  user: app_tenant
  password: ${APP_DB_PASSWORD}
  sslmode: verify-full
tenant_setting: app.tenant_id
mode: enforce
tables:
  Orders: Tenant_ID
  billing.invoices: tenant_id
shared_tables: [plans, ref.Countries]
unknown_tables: allow
dry_run: true
tenants:
  acme:
    users:
      acme_app: {password: "SCRAM-SHA-256$4096:c2FsdA==$AAAA:BBBB"}
      acme_ro: {password: plain}
    limits: {max_connections: 50, statement_timeout_ms: 5000, queries_per_second: 1000}
  globex:
    users:
      globex_app: {password: pw}
    upstream_user: globex_role
limits: {max_client_connections: 100, handshake_timeout_s: 2.5}
audit: {statements: true, output: /var/log/tg.log}
logging: {level: debug, format: json}
"""


def parse(text: str, env: dict[str, str] | None = None, source: str = "policy.yaml") -> Policy:
    return parse_policy(text, source, env or {})


def error_of(text: str, env: dict[str, str] | None = None, source: str = "policy.yaml") -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, env, source)
    return str(info.value)


# --- defaults and the full file --------------------------------------------------------


def test_minimal_policy_defaults() -> None:
    policy = parse(MINIMAL)
    assert (policy.listen.host, policy.listen.port, policy.listen.tls) == ("127.0.0.1", 6432, None)
    assert (policy.metrics.host, policy.metrics.port, policy.metrics.enabled) == (
        "127.0.0.1",
        9187,
        True,
    )
    assert (policy.upstream.host, policy.upstream.port) == ("127.0.0.1", 5432)
    assert policy.upstream.password is None
    assert policy.upstream.sslmode == "prefer"
    assert policy.tenant_setting == "app.tenant_id"
    assert policy.mode == "both"
    assert policy.tables == {}
    assert policy.shared_tables == ()
    assert policy.unknown_tables == "reject"
    assert policy.dry_run is False
    assert policy.limits.max_client_connections == 10000
    assert policy.limits.max_message_bytes == 64 * 1024 * 1024
    assert policy.audit.statements is False
    assert (policy.logging.level, policy.logging.format) == ("info", "text")
    assert policy.tenants["acme"].limits.max_connections is None
    assert policy.enforces_predicates
    assert policy.injects_tenant


def test_full_policy() -> None:
    policy = parse(FULL, {"APP_DB_PASSWORD": "s3cret"})
    assert policy.listen.port == 7000
    assert policy.metrics.enabled is False
    assert policy.upstream.password == "s3cret"
    assert policy.upstream.sslmode == "verify-full"
    assert policy.tables == {"orders": "tenant_id", "billing.invoices": "tenant_id"}
    assert policy.shared_tables == ("plans", "ref.countries")
    assert policy.unknown_tables == "allow"
    assert policy.tenants["acme"].limits.queries_per_second == 1000
    assert policy.tenants["globex"].upstream_user == "globex_role"
    assert policy.limits.handshake_timeout_s == 2.5
    assert policy.logging.format == "json"
    assert policy.find_user("acme_ro") == ("acme", policy.tenants["acme"].users["acme_ro"])
    assert policy.find_user("globex_app") is not None
    assert policy.find_user("nobody") is None
    assert sorted(policy.plaintext_users()) == ["acme_ro", "globex_app"]
    assert policy.tenants["acme"].users["acme_app"].is_verifier


@pytest.mark.parametrize(
    ("mode", "enforces", "injects"),
    [("enforce", True, False), ("rls", False, True), ("both", True, True)],
)
def test_mode_properties(mode: str, enforces: bool, injects: bool) -> None:
    policy = parse(MINIMAL + f"mode: {mode}\n")
    assert (policy.enforces_predicates, policy.injects_tenant) == (enforces, injects)


def test_policy_is_immutable() -> None:
    policy = parse(MINIMAL)
    with pytest.raises(ValidationError):
        policy.mode = "rls"
    with pytest.raises(ValidationError):
        policy.upstream.database = "other"


# --- ${VAR} expansion -------------------------------------------------------------------


def test_env_expansion_in_strings_lists_and_numbers() -> None:
    text = (
        MINIMAL.replace(
            "user: app_tenant}", "user: '${U}_x', password: '${A}:${B}', port: '${PORT}'}"
        )
        + "shared_tables: ['${T}']\n"
    )
    policy = parse(text, {"U": "role", "A": "one", "B": "two", "PORT": "6000", "T": "plans"})
    assert policy.upstream.user == "role_x"
    assert policy.upstream.password == "one:two"
    assert policy.upstream.port == 6000
    assert policy.shared_tables == ("plans",)


def test_env_values_are_not_reexpanded_or_parsed_as_yaml() -> None:
    text = MINIMAL.replace("user: app_tenant}", "user: app_tenant, password: '${PW}'}")
    tricky = "${OTHER}\nmode: rls\n- [x"
    policy = parse(text, {"PW": tricky})
    assert policy.upstream.password == tricky
    assert policy.mode == "both"


def test_dollar_without_braces_is_literal() -> None:
    text = MINIMAL.replace("password: pw", "password: $PW$x")
    assert parse(text).tenants["acme"].users["acme_app"].password == "$PW$x"


@pytest.mark.parametrize(
    ("text", "path", "var"),
    [
        (
            MINIMAL.replace("user: app_tenant}", "user: app_tenant, password: '${DB_PW}'}"),
            "upstream.password",
            "DB_PW",
        ),
        (MINIMAL + "shared_tables: [plans, '${T2}']\n", "shared_tables.1", "T2"),
        (
            MINIMAL.replace("password: pw", "password: '${ACME_PW}'"),
            "tenants.acme.users.acme_app.password",
            "ACME_PW",
        ),
    ],
)
def test_missing_env_var_names_key_path(text: str, path: str, var: str) -> None:
    message = error_of(text, source="/etc/tg/policy.yaml")
    assert message.startswith("/etc/tg/policy.yaml: ")
    assert f"{path}: environment variable {var} is not set" in message


def test_env_defaults_to_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TG_TEST_DB_PW", "from-env")
    text = MINIMAL.replace("user: app_tenant}", "user: app_tenant, password: '${TG_TEST_DB_PW}'}")
    assert parse_policy(text).upstream.password == "from-env"


# --- unknown keys and invalid values ----------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "path"),
    [
        ("lisen: {port: 1}\n", "lisen"),
        ("listen: {prot: 1}\n", "listen.prot"),
        ("limits: {max_conections: 5}\n", "limits.max_conections"),
        ("audit: {file: x}\n", "audit.file"),
    ],
)
def test_unknown_keys_rejected_with_path(extra: str, path: str) -> None:
    message = error_of(MINIMAL + extra)
    assert f"{path}: unknown key" in message


def test_unknown_nested_tenant_keys() -> None:
    text = """
upstream: {database: app, user: u}
tenants:
  acme:
    users: {acme_app: {password: pw, role: admin}}
    limits: {max_conections: 5}
"""
    message = error_of(text)
    assert "tenants.acme.users.acme_app.role: unknown key" in message
    assert "tenants.acme.limits.max_conections: unknown key" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "upstream: {database: app}\ntenants: {a: {users: {u: {password: p}}}}\n",
            "upstream.user: Field required",
        ),
        ("tenants: {a: {users: {u: {password: p}}}}\n", "upstream: Field required"),
        ("upstream: {database: app, user: u}\n", "tenants: Field required"),
        ("upstream: {database: app, user: u}\ntenants: {}\n", "tenants: "),
        ("upstream: {database: app, user: u}\ntenants: {a: {users: {}}}\n", "tenants.a.users"),
        (
            "upstream: {database: app, user: u}\ntenants: {a: {users: {u: {password: ''}}}}\n",
            "tenants.a.users.u.password",
        ),
        (MINIMAL + "listen: {port: 70000}\n", "listen.port"),
        (MINIMAL + "mode: strict\n", "mode"),
        (MINIMAL + "unknown_tables: ignore\n", "unknown_tables"),
        (MINIMAL + "tenant_setting: tenant_id\n", "tenant_setting: must be a custom setting"),
        (MINIMAL + "tenant_setting: 'app.x; drop'\n", "tenant_setting"),
        (MINIMAL + "limits: {max_message_bytes: 10}\n", "limits.max_message_bytes"),
        (MINIMAL.replace("user: app_tenant}", "user: u, sslmode: allow}"), "upstream.sslmode"),
        (
            MINIMAL.replace("pw}}}", "pw}}, limits: {max_connections: 0}}"),
            "tenants.acme.limits.max_connections",
        ),
    ],
)
def test_invalid_values_name_the_key(text: str, expected: str) -> None:
    message = error_of(text, source="cfg.yaml")
    assert message.startswith("cfg.yaml: ")
    assert expected in message


# --- tenant ids, users, tables ----------------------------------------------------------


def tenants_yaml(tenant_key: str) -> str:
    return (
        "upstream: {database: app, user: u}\n"
        f"tenants:\n  {tenant_key}: {{users: {{u: {{password: p}}}}}}\n"
    )


@pytest.mark.parametrize(
    "tenant_id",
    ["'bad id'", "''", "'-leading'", "'a/b'", '"x\'y"', "'t" + "x" * 63 + "'", "'é'", "'a;b'"],
)
def test_invalid_tenant_ids(tenant_id: str) -> None:
    message = error_of(tenants_yaml(tenant_id))
    assert "tenants: tenant id" in message
    assert "1-63 characters" in message


@pytest.mark.parametrize("tenant_id", ["acme", "t-1", "a.b:c@d", "_x", "9lives", "x" * 63])
def test_valid_tenant_ids(tenant_id: str) -> None:
    assert list(parse(tenants_yaml(tenant_id)).tenants) == [tenant_id]


def test_int_tenant_keys_become_strings() -> None:
    text = """
upstream: {database: app, user: u}
tenants:
  123: {users: {u123: {password: p}}}
  456: {users: {u456: {password: p}}}
"""
    policy = parse(text)
    assert list(policy.tenants) == ["123", "456"]
    found = policy.find_user("u456")
    assert found is not None
    assert found[0] == "456"


@pytest.mark.parametrize("key", ["0123", "007", "1_000", "12:30", "0x1f", "1.50", "yes", "null"])
def test_numeric_looking_tenant_key_keeps_its_text_or_is_refused(key: str) -> None:
    try:
        policy = parse(tenants_yaml(key))
    except ConfigError:
        return
    assert list(policy.tenants) == [key]


def test_duplicate_user_across_tenants() -> None:
    text = MINIMAL + "  globex: {users: {acme_app: {password: other}}}\n"
    message = error_of(text)
    assert "user 'acme_app' is listed under tenants 'acme' and 'globex'" in message


@pytest.mark.parametrize(
    "table",
    ["'orders; drop table x'", "a.b.c", "'1orders'", "'or ders'", "'.orders'", "'orders.'", "''"],
)
def test_invalid_scoped_table_names(table: str) -> None:
    message = error_of(MINIMAL + f"tables: {{{table}: tenant_id}}\n")
    assert "tables: " in message
    assert "is not a table name" in message


@pytest.mark.parametrize("column", ["'tenant id'", "'t.id'", "'1col'", "''"])
def test_invalid_tenant_column_names(column: str) -> None:
    message = error_of(MINIMAL + f"tables: {{orders: {column}}}\n")
    assert "is not a column name" in message


def test_invalid_shared_table_name() -> None:
    assert "is not a table name" in error_of(MINIMAL + "shared_tables: ['a b']\n")


def test_valid_table_names_are_lowercased() -> None:
    policy = parse(
        MINIMAL + "tables: {Orders: TENANT_ID, s.T$1: c, _x: _y}\nshared_tables: [Public.Plans]\n"
    )
    assert policy.tables == {"orders": "tenant_id", "s.t$1": "c", "_x": "_y"}
    assert policy.shared_tables == ("public.plans",)


@pytest.mark.parametrize("shared", ["orders", "ORDERS", "Orders"])
def test_table_both_scoped_and_shared(shared: str) -> None:
    message = error_of(MINIMAL + f"tables: {{orders: tenant_id}}\nshared_tables: [{shared}]\n")
    assert "<top level>: tables listed as both scoped and shared: ['orders']" in message


# --- files ------------------------------------------------------------------------------


def test_load_policy_resolves_tls_paths_relative_to_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "policy.yaml"
    path.write_text(
        MINIMAL
        + "listen: {tls: {cert: certs/server.crt, key: /abs/server.key, require: true}}\n"
        + "",
        encoding="utf-8",
    )
    policy = load_policy(path, env={})
    assert policy.listen.tls is not None
    assert policy.listen.tls.cert == folder / "certs" / "server.crt"
    assert policy.listen.tls.key == Path("/abs/server.key")
    assert policy.listen.tls.require is True


def test_load_policy_resolves_sslrootcert(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        MINIMAL.replace("user: app_tenant}", "user: u, sslrootcert: ca.pem}"), encoding="utf-8"
    )
    policy = load_policy(str(path), env={})
    assert policy.upstream.sslrootcert == tmp_path / "ca.pem"
    assert policy.listen.tls is None


def test_load_policy_without_paths_is_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(MINIMAL, encoding="utf-8")
    assert load_policy(path, env={}) == parse(MINIMAL)


def test_load_policy_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "bogus: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: bogus: unknown key")):
        load_policy(path, env={})


def test_load_policy_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: cannot read")):
        load_policy(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [\n", "not valid YAML"),
        ("- a\n- b\n", "<top level>: must be a mapping of keys"),
        ("", "<top level>: must be a mapping of keys"),
        ("just a string", "<top level>: must be a mapping of keys"),
        ("!!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ],
)
def test_not_a_policy(text: str, expected: str) -> None:
    message = error_of(text, source="x.yaml")
    assert message.startswith("x.yaml: ")
    assert expected in message


# --- the example files in config/ -------------------------------------------------------

EXAMPLES = sorted([*CONFIG_DIR.glob("*.yaml"), *CONFIG_DIR.glob("*.yml")])
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@pytest.mark.parametrize(
    "path",
    EXAMPLES or [pytest.param(None, marks=pytest.mark.skip(reason="config/ has no examples yet"))],
    ids=lambda p: p.name if isinstance(p, Path) else "none",
)
def test_example_config_is_valid(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    env = {name: f"example-{name.lower()}" for name in _ENV_REF.findall(text)}
    policy = load_policy(path, env=env)
    assert policy.tenants
    assert policy.upstream.database
