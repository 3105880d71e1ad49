"""injection: where the tenant goes into simple Queries and extended pipelines."""

from __future__ import annotations

import pytest

from tenantgate.analysis import AnalysisPolicy, analyse_sql
from tenantgate.injection import TenantInjector, is_internal_name, original_position
from tenantgate.protocol.framing import MessageReader

POLICY = AnalysisPolicy(scoped_tables={"orders": "tenant_id"}, check_predicates=False)
SET = b"SELECT pg_catalog.set_config('app.tenant_id', 'acme', true)"


def rewrite(sql: str) -> tuple[bytes, frozenset[int], tuple[tuple[int, int], ...]]:
    analysis = analyse_sql(sql, POLICY)
    assert analysis.rejection is None
    result = TenantInjector("app.tenant_id", "acme").rewrite_query(
        sql.encode(), analysis.statements
    )
    return result.text, result.hidden_statements, result.shifts


def test_single_statement_gets_a_prefix() -> None:
    text, hidden, _ = rewrite("SELECT * FROM orders")
    assert text == SET + b";SELECT * FROM orders"
    assert hidden == {0}


def test_reinjected_after_commit_and_not_before_transaction_control() -> None:
    text, hidden, _ = rewrite("BEGIN; SELECT 1; COMMIT; SELECT 2")
    assert text == b"BEGIN;" + SET + b"; SELECT 1; COMMIT;" + SET + b"; SELECT 2"
    assert hidden == {1, 4}


@pytest.mark.parametrize("sql", ["COMMIT", "ROLLBACK", "BEGIN", "SET TRANSACTION READ ONLY", ""])
def test_transaction_control_alone_is_left_alone(sql: str) -> None:
    text, hidden, shifts = rewrite(sql)
    assert text == sql.encode()
    assert hidden == frozenset()
    assert shifts == ()


def test_error_positions_map_back_to_the_client_text() -> None:
    sql = "SELECT 'é'; COMMIT; SELECT nocolumn FROM orders"
    text, _, shifts = rewrite(sql)
    server_text = text.decode()
    # The server reports 1-based character positions in the text it received.
    server_position = server_text.index("nocolumn") + 1
    assert original_position(server_position, shifts) == sql.index("nocolumn") + 1
    inside_injection = server_text.index("set_config") + 1
    assert original_position(inside_injection, shifts) is None
    assert original_position(1 + len(SET) + 1, shifts) == 1  # first char of the client text


def test_extended_injection_parses_once_then_binds() -> None:
    injector = TenantInjector("app.tenant_id", "acme")
    first = injector.before_execute(transaction_control=False)
    assert first is not None
    assert [m[0] for m in _messages(first)] == [ord("P"), ord("B"), ord("E"), ord("C")]
    assert injector.prepared
    assert injector.before_execute(transaction_control=False) is None  # same transaction
    injector.after_sync()
    again = injector.before_execute(transaction_control=False)
    assert again is not None
    assert [m[0] for m in _messages(again)] == [ord("B"), ord("E"), ord("C")]


def test_no_injection_before_transaction_control_but_after_it() -> None:
    injector = TenantInjector("app.tenant_id", "acme")
    assert injector.before_execute(transaction_control=True) is None
    assert injector.before_execute(transaction_control=False) is not None
    assert injector.before_execute(transaction_control=True) is None
    assert injector.before_execute(transaction_control=False) is not None


def test_deallocate_all_prepares_under_a_new_name() -> None:
    injector = TenantInjector("app.tenant_id", "acme")
    assert injector.before_execute(transaction_control=False) is not None
    old = injector.statement_name
    injector.statements_dropped()
    injector.after_sync()
    messages = _messages(injector.before_execute(transaction_control=False) or b"")
    assert messages[0][0] == ord("P")
    assert injector.statement_name != old
    assert injector.statement_name.encode() in messages[0][1]
    assert is_internal_name(injector.statement_name)


def test_tenant_never_appears_in_the_extended_statement_text() -> None:
    injector = TenantInjector("app.tenant_id", "acme")
    parse = _messages(injector.before_execute(transaction_control=False) or b"")[0]
    assert b"acme" not in parse[1]  # bound as a parameter: pg_stat_statements never sees it


def test_unsafe_values_are_refused() -> None:
    with pytest.raises(ValueError, match="unsafe"):
        TenantInjector("app.tenant_id", "x'; DROP TABLE orders; --")


def _messages(data: bytes) -> list[tuple[int, bytes]]:
    reader = MessageReader()
    reader.feed(data)
    return reader.drain()


def test_no_reinjection_inside_a_block_that_has_the_tenant() -> None:
    injector = TenantInjector("app.tenant_id", "acme")
    begin = analyse_sql("BEGIN", POLICY).statements
    select = analyse_sql("SELECT 1", POLICY).statements
    savepoint = analyse_sql("ROLLBACK TO SAVEPOINT a", POLICY).statements
    injector.observe_state(idle_in_block=False)
    assert injector.rewrite_query(b"BEGIN", begin).hidden_statements == frozenset()
    injector.observe_state(idle_in_block=True)  # BEGIN ran: the block has no tenant yet
    assert injector.rewrite_query(b"SELECT 1", select).hidden_statements == {0}
    injector.observe_state(idle_in_block=True)  # now it has
    assert injector.rewrite_query(b"SELECT 1", select).text == b"SELECT 1"
    assert injector.before_execute(transaction_control=False) is None
    # A ROLLBACK TO may revert the set_config: the next statement gets it again.
    injector.rewrite_query(b"ROLLBACK TO SAVEPOINT a", savepoint)
    injector.observe_state(idle_in_block=True)
    assert injector.rewrite_query(b"SELECT 1", select).hidden_statements == {0}
    # Not idle in a block (implicit transaction, pipelined, aborted): always inject.
    injector.observe_state(idle_in_block=False)
    assert injector.rewrite_query(b"SELECT 1", select).hidden_statements == {0}


def test_query_joining_an_injected_unsynced_segment_is_left_alone() -> None:
    """Parse/Bind/Execute (injected) then a Query before Sync: one transaction."""
    injector = TenantInjector("app.tenant_id", "acme")
    select = analyse_sql("SELECT 1", POLICY).statements
    injector.observe_state(idle_in_block=False)
    assert injector.before_execute(transaction_control=False) is not None
    assert injector.rewrite_query(b"SELECT 1", select).text == b"SELECT 1"
    # After the Query the next Execute checks again (the Query may have ended it).
    assert injector.before_execute(transaction_control=False) is not None


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM orders",
        "SELECT 'é' FROM orders WHERE id = 1;",
        "  UPDATE orders SET note = 'a;b' WHERE id = 2  ",
        "INSERT INTO orders (id) VALUES (3) -- trailing comment",
    ],
)
@pytest.mark.parametrize("in_block", [False, True])
def test_one_statement_shortcut_is_the_general_rewrite(sql: str, in_block: bool) -> None:
    """rewrite_query answers one-statement Queries without _rewrite (or its cache): the
    same text, hidden statements and position shifts as _rewrite would give."""
    statements = analyse_sql(sql, POLICY).statements
    assert len(statements) == 1
    injector = TenantInjector("app.tenant_id", "acme")
    injector.tenant_in_block = in_block
    injector.observe_state(idle_in_block=in_block)
    fast = injector.rewrite_query(sql.encode(), statements)
    general = TenantInjector("app.tenant_id", "acme")._rewrite(sql.encode(), statements, in_block)
    assert (fast.text, fast.hidden_statements, fast.shifts) == (
        general.text,
        general.hidden_statements,
        general.shifts,
    )
    assert injector.tenant_in_block
