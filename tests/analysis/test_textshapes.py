"""Text shapes: an analysis found by the masked SQL text equals a fresh one.

The text level answers before any parse, so every way PostgreSQL's lexer
could read two texts of one key differently must end in a miss, never in a
borrowed analysis.  Each test learns texts in a cache and compares every
answer with ``analyse_sql``; the lexer traps (comments, dollar quotes,
``U&''``/``E''`` strings, signs, int4 overflow, continued strings) are spelled
out, the corpus supplies the breadth and hypothesis the rest.
"""

from __future__ import annotations

import array
import re

import pytest
from analysis_corpus import POLICY, RLS_POLICY, load_cases
from hypothesis import given, settings
from hypothesis import strategies as st
from pglast.parser import parse_sql_json
from test_shapes import through_one_cache, variants, verdicts

from tenantgate.analysis import AnalysisCache, AnalysisPolicy, analyse_sql, check_tenant
from tenantgate.analysis.textshapes import (
    LANE_DIGIT,
    LANE_INT4,
    LANE_NUMERIC,
    LANE_TENANT,
    _kind,
    digits_of,
    literal_slots,
    literals_of,
    text_key,
)

CASES = load_cases()
BASE = "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 10"


def _cache_after(*texts: str) -> AnalysisCache:
    cache = AnalysisCache(POLICY)
    for sql in texts:
        verdicts(POLICY, sql, cache)
    return cache


def test_a_new_text_of_a_known_key_is_not_parsed() -> None:
    cache = _cache_after(BASE)
    assert len(cache.text_shapes) == 1
    other = "SELECT id FROM orders WHERE tenant_id = 'gbex' AND id = 77"
    verdicts(POLICY, other, cache)
    assert cache.text_shapes.hits == 1
    assert cache.get_or_analyse(other).statements[0].tenant_constants == {"gbex"}
    # Another length is another key: the parse-tree level answers instead.
    verdicts(POLICY, "SELECT id FROM orders WHERE tenant_id = 'globex' AND id = 7", cache)
    assert cache.text_shapes.hits == 1


def test_text_key_masks_only_standalone_literals() -> None:
    key = text_key("SELECT a1, 'x''y', -42, $1, 1.5, t.2, E'z', U&'w', 7e3 FROM t LIMIT 5")
    assert key is not None
    assert literals_of(key) == ["'x''y'", "-42", "5"]
    assert key[0] == (
        "SELECT a1, \x00s6\x00, \x00I3\x00, $1, 1.5, t.2, E'z', U&'w', 7e3 FROM t LIMIT \x00i1\x00"
    )
    assert text_key("SELECT 'é'") is None  # not ASCII: locations would not line up
    big = text_key("SELECT 2147483647, 2147483648, -2147483648")
    assert big is not None
    # int4 or numeric: PostgreSQL's choice (by the digits, before the minus is folded in).
    assert big[0] == "SELECT \x00i10\x00, \x00n10\x00, \x00N11\x00"


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id FROM orders WHERE tenant_id = 'acme' /* 'x' */ AND id = 1",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 1 -- 'x'",
        "SELECT id FROM orders WHERE tenant_id = $$acme$$ AND id = 1",
        "SELECT id FROM orders WHERE tenant_id = $q$ 'acme' $q$ AND id = 1",
        "SELECT id FROM orders WHERE tenant_id = 'ac'\n'me' AND id = 1",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = id -1",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = id--1\n",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND id::float(10) = 1",
        "SELECT id FROM orders WHERE tenant_id = 'acme' AND \"x 1\" = 1",
    ],
)
def test_texts_whose_literals_the_tree_does_not_confirm_get_no_key(sql: str) -> None:
    key = text_key(sql)
    assert key is not None
    assert literal_slots(key, parse_sql_json(sql)) is None
    cache = _cache_after(sql)
    assert len(cache.text_shapes) == 0


def test_literal_slots_pair_each_constant_with_its_literal() -> None:
    sql = "INSERT INTO orders (item, tenant_id) VALUES ('book', 'acme')"
    key = text_key(sql)
    assert key is not None
    assert literal_slots(key, parse_sql_json(sql)) == [0, 1]
    sql = "SELECT id FROM orders WHERE id = 0 AND tenant_id = 'acme' AND id < 2147483648"
    key = text_key(sql)
    assert key is not None
    assert literal_slots(key, parse_sql_json(sql)) == [0, 1, 2]
    # The tree keeps OFFSET before LIMIT: pairing goes by location, not by order.
    sql = "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 1 LIMIT 2 OFFSET 3"
    key = text_key(sql)
    assert key is not None
    assert literal_slots(key, parse_sql_json(sql)) == [0, 1, 3, 2]
    # A sign the grammar folds into the constant pairs; the constant sits at the minus.
    sql = "UPDATE orders SET id = id + -5, item = -2147483648 WHERE tenant_id = -0"
    key = text_key(sql)
    assert key is not None
    assert literal_slots(key, parse_sql_json(sql)) == [0, 1, 2]


@pytest.mark.parametrize(
    ("learnt", "then"),
    [
        # A string's content may hold anything but a lone quote; the text stays one token.
        (BASE, "SELECT id FROM orders WHERE tenant_id = 'a''b' AND id = 10"),
        (BASE, "SELECT id FROM orders WHERE tenant_id = '\\'' AND id = 10"),
        (BASE, "SELECT id FROM orders WHERE tenant_id = '--ab' AND id = 10"),
        (BASE, "SELECT id FROM orders WHERE tenant_id = '/*ab' AND id = 10"),
        (BASE, "SELECT id FROM orders WHERE tenant_id = '$$ab' AND id = 10"),
        (BASE, "SELECT id FROM orders WHERE tenant_id = 'gbex' AND id = 00"),
        # A lone quote changes the literals, so the key.
        (BASE, "SELECT id FROM orders WHERE tenant_id = 'a' OR 'b' AND id = 10"),
        # Tenant values spelt as integers, and an integer past int4.
        (
            "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 2147483647",
            "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 2147483648",
        ),
        (
            "SELECT id FROM orders WHERE tenant_id = 1234 AND id = 1",
            "SELECT id FROM orders WHERE tenant_id = 0042 AND id = 1",
        ),
        (
            "SELECT id FROM orders WHERE tenant_id = -123 AND id = 1",
            "SELECT id FROM orders WHERE tenant_id = -000 AND id = 1",
        ),
        (
            "UPDATE orders SET id = id + -2147483648 WHERE tenant_id = 'acme'",
            "UPDATE orders SET id = id + -2147483647 WHERE tenant_id = 'acme'",
        ),
        (
            "UPDATE orders SET id = id + -5 WHERE tenant_id = 'acme'",
            "UPDATE orders SET id = id + -7 WHERE tenant_id = 'gbex'",
        ),
    ],
)
def test_same_key_texts_get_their_own_analysis(learnt: str, then: str) -> None:
    cache = _cache_after(learnt)
    verdicts(POLICY, then, cache)
    verdicts(POLICY, learnt, AnalysisCache(POLICY))


def test_corpus_variants_through_text_shapes() -> None:
    hits = 0
    for case in CASES:
        policy = RLS_POLICY if case.mode == "rls" else POLICY
        cache = AnalysisCache(policy)
        cache.get_or_analyse(case.sql)
        for variant in variants(case.sql):
            verdicts(policy, variant, cache)
        hits += cache.text_shapes.hits
    assert hits > 300  # the level is exercised, not bypassed


literal = st.one_of(
    st.text(alphabet="ac'\\-/*$e\n ", min_size=0, max_size=6).map(
        lambda s: "'" + s.replace("'", "''") + "'"
    ),
    st.text(alphabet="ac'\\-/*$e\n ", min_size=1, max_size=6),  # raw text between the holes
    st.integers(-3_000_000_000, 3_000_000_000).map(str),
    st.sampled_from(["'acme'", "'gbex'", "NULL", "-1", "E'acme'", "$$acme$$", "U&'acme'"]),
)
templates = st.sampled_from(
    [
        "SELECT id FROM orders WHERE tenant_id = {0} AND id = {1}",
        "SELECT id FROM orders WHERE tenant_id = {0}{1}",
        "SELECT id FROM orders WHERE tenant_id = {0} /* {1} */",
        "UPDATE orders SET item = {1} WHERE tenant_id = {0}",
        "INSERT INTO orders (item, tenant_id) VALUES ({1}, {0})",
        "SELECT id FROM orders WHERE id = {1} AND tenant_id = {0} LIMIT {1}",
        "UPDATE orders SET id = id -{1} WHERE tenant_id = {0}",
        "UPDATE orders SET id = id + {1} WHERE tenant_id = {0}",
    ]
)


@settings(max_examples=300, deadline=None)
@given(templates, st.lists(st.tuples(literal, literal), min_size=2, max_size=8))
def test_generated_texts_through_one_cache(template: str, pairs: list[tuple[str, str]]) -> None:
    through_one_cache(template, pairs)


# --- the digit key: a text's key found without the literal scan ---------------------------


def _filed(policy: object, learnt: str) -> AnalysisCache:
    """A cache that knows ``learnt``'s text key and has looked ``learnt`` up by it (which
    files it under its digit key, if it qualifies)."""
    cache = AnalysisCache(policy)  # type: ignore[arg-type]
    cache.get_or_analyse(learnt)
    key = text_key(learnt)
    if key is not None:
        cache.text_shapes.lookup(key)
    return cache


def _digit_answer(cache: AnalysisCache, sql: str) -> object:
    """The digit level's answer for ``sql``, checked against the literal scan and a
    fresh analysis whenever it gives one."""
    found = cache.text_shapes.lookup_bytes(sql.encode())
    if found is not None:
        key = text_key(sql)
        assert key is not None
        assert found == cache.text_shapes.lookup(key), sql
        fresh = analyse_sql(sql, cache.policy)
        assert found == fresh, sql
        for tenant in ("acme", "gbex", "1234", "42"):
            assert check_tenant(found, tenant) == check_tenant(fresh, tenant)
    return found


def test_a_text_differing_in_literal_digits_is_answered_by_its_digit_key() -> None:
    cache = _filed(POLICY, BASE)
    hits = cache.text_shapes.hits
    for number in ("12", "00", "99", "10"):
        assert _digit_answer(cache, BASE.replace("10", number)) is not None
    assert cache.text_shapes.hits == hits + 8  # each answer, and the literal scan's check
    # Through the cache's entry points, which try it first.
    sql = BASE.replace("10", "37")
    found = cache.without_parse(sql, sql.encode())
    assert found is not None
    assert found[0] == analyse_sql(sql, POLICY)
    assert cache.get_or_analyse(BASE.replace("10", "38")) == analyse_sql(
        BASE.replace("10", "38"), POLICY
    )
    assert cache.text_shapes.hits == hits + 10


@pytest.mark.parametrize(
    ("learnt", "then"),
    [
        # Digits outside integer literals are compared: names, $n, strings.
        (
            "SELECT id FROM orders o1 WHERE tenant_id = 'acme' AND id = 1",
            "SELECT id FROM orders o2 WHERE tenant_id = 'acme' AND id = 1",
        ),
        (
            "SELECT id AS c1 FROM orders WHERE tenant_id = 'acme' AND id = 1",
            "SELECT id AS c2 FROM orders WHERE tenant_id = 'acme' AND id = 1",
        ),
        (
            "SELECT \"i1\" FROM orders WHERE tenant_id = 'acme' AND id = 1",
            "SELECT \"i2\" FROM orders WHERE tenant_id = 'acme' AND id = 1",
        ),
        (
            "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = $1",
            "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = $2",
        ),
        (
            "SELECT id FROM orders WHERE tenant_id = 'ac1' AND id = 1",
            "SELECT id FROM orders WHERE tenant_id = 'ac2' AND id = 1",
        ),
        # An integer literal that changes between int4 and numeric changes the key.
        (
            "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 2147483647",
            "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = 2147483648",
        ),
        (
            "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = -2147483647",
            "SELECT id FROM orders WHERE tenant_id = 'acme' AND id = -2147483648",
        ),
    ],
)
def test_the_digit_key_declines_what_the_literal_scan_would_tell_apart(
    learnt: str, then: str
) -> None:
    cache = _filed(POLICY, learnt)
    assert _digit_answer(cache, learnt) is not None  # filed: the refusal below is the check's
    assert cache.text_shapes.lookup_bytes(then.encode()) is None
    verdicts(POLICY, then, cache)


def test_texts_with_other_string_literals_get_no_digit_key() -> None:
    sql = "UPDATE orders SET item = 'book' WHERE tenant_id = 'acme' AND id = 1"
    cache = _filed(POLICY, sql)
    assert cache.text_shapes.hits == 1  # the text level answers; the digit level does not
    assert cache.text_shapes.lookup_bytes(sql.replace("= 1", "= 3").encode()) is None


def test_integer_tenant_values_are_read_from_the_new_text() -> None:
    cache = _filed(POLICY, "SELECT id FROM orders WHERE tenant_id = 1234 AND id = 1")
    for tenant in ("1234", "4321", "0042", "9999"):
        found = _digit_answer(cache, f"SELECT id FROM orders WHERE tenant_id = {tenant} AND id = 1")
        assert found is not None
        assert found.statements[0].tenant_constants == {str(int(tenant))}  # type: ignore[attr-defined]


def test_corpus_digit_variants_through_the_digit_key() -> None:
    answered = 0
    for case in CASES:
        cache = _filed(RLS_POLICY if case.mode == "rls" else POLICY, case.sql)
        for digit in "0123456789":
            variant = "".join(digit if char.isdigit() else char for char in case.sql)
            answered += _digit_answer(cache, variant) is not None
    assert answered > 100  # the level is exercised, not bypassed


@settings(max_examples=300, deadline=None)
@given(
    templates,
    st.tuples(literal, literal),
    st.lists(st.tuples(st.integers(0, 200), st.sampled_from("0123456789")), max_size=6),
)
def test_generated_digit_changes_get_the_literal_scans_answer(
    template: str, pair: tuple[str, str], changes: list[tuple[int, str]]
) -> None:
    learnt = template.format(*pair)
    cache = _filed(POLICY, learnt)
    digits = [i for i, char in enumerate(learnt) if char.isdigit()]
    then = list(learnt)
    for index, digit in changes:
        if digits:
            then[digits[index % len(digits)]] = digit
    _digit_answer(cache, "".join(then))


def test_analyses_are_shared_by_key_and_tenant_values_only() -> None:
    cache = _filed(POLICY, BASE)
    shapes = cache.text_shapes
    first = shapes.lookup_bytes(BASE.replace("10", "11").encode())
    again = shapes.lookup_bytes(BASE.replace("10", "12").encode())
    other = shapes.lookup_bytes(BASE.replace("acme", "gbex").replace("10", "13").encode())
    assert first is not None
    assert again is first
    assert other is None  # another tenant's text is another digit key ...
    key = text_key(BASE.replace("acme", "gbex"))
    assert key is not None
    gbex = shapes.lookup(key)  # ... which the literal scan answers, with its own value
    assert gbex is not None
    assert gbex is not first
    assert gbex.statements[0].tenant_constants == {"gbex"}
    assert first.statements[0].tenant_constants == {"acme"}
    shapes.clear()
    assert shapes.lookup_bytes(BASE.encode()) is None


def test_texts_of_one_digit_key_but_other_names_keep_their_own_text_keys() -> None:
    # Tenants named with digits: one digit key, a text key per tenant, each answered.
    texts = [f"SELECT id FROM orders WHERE tenant_id = 'ac{n}' AND id = 1" for n in range(5)]
    cache = _filed(POLICY, texts[0])
    for sql in texts[1:]:
        key = text_key(sql)
        assert key is not None
        cache.text_shapes.lookup(key)
    for n, sql in enumerate(texts):
        found = _digit_answer(cache, sql.replace("= 1", "= 7"))
        assert found is not None
        assert found.statements[0].tenant_constants == {f"ac{n}"}  # type: ignore[attr-defined]


@given(st.integers(0, 10**12) | st.integers(2**31 - 3, 2**31 + 3), st.integers(0, 12))
def test_int4_or_numeric_is_decided_by_the_value(value: int, zeros: int) -> None:
    digits = "0" * zeros + str(value)
    fits = value <= 2**31 - 1
    assert _kind(digits) == ("i" if fits else "n")
    assert _kind("-" + digits) == ("I" if fits else "N")


# Tables whose names differ in a digit, scoped by different columns: which literal is the
# tenant value depends on a digit outside the literals.
DIGIT_TABLES = AnalysisPolicy(
    scoped_tables={"t1": "a", "t2": "b", "t3": "a"}, shared_tables=frozenset({"t4"})
)
DIGIT_TEXT = "SELECT x FROM t{} WHERE a = {} AND b = {}"


def test_tenant_literals_are_the_text_keys_not_the_digit_keys() -> None:
    cache = _filed(DIGIT_TABLES, DIGIT_TEXT.format(1, 11, 22))
    key = text_key(DIGIT_TEXT.format(2, 11, 22))
    assert key is not None
    cache.get_or_analyse(DIGIT_TEXT.format(2, 33, 44))  # learns t2's text key
    assert cache.text_shapes.lookup(key) is not None  # files t2 under the same digit key
    # t2's tenant value is b's literal: 99 here, whatever a's literal says.
    found = _digit_answer(cache, DIGIT_TEXT.format(2, 77, 99))
    assert found is not None
    assert found.statements[0].tenant_constants == {"99"}  # type: ignore[attr-defined]
    found = _digit_answer(cache, DIGIT_TEXT.format(1, 77, 99))
    assert found is not None
    assert found.statements[0].tenant_constants == {"77"}  # type: ignore[attr-defined]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 4), st.integers(10, 99), st.integers(10, 99)), max_size=4),
    st.tuples(st.integers(1, 4), st.integers(10, 99), st.integers(10, 99)),
)
def test_generated_texts_of_one_digit_key_get_their_own_tenant_literals(
    learnt: list[tuple[int, int, int]], then: tuple[int, int, int]
) -> None:
    cache = _filed(DIGIT_TABLES, DIGIT_TEXT.format(1, 10, 20))
    for table, a, b in learnt:
        sql = DIGIT_TEXT.format(table, a, b)
        cache.get_or_analyse(sql)
        key = text_key(sql)
        assert key is not None
        cache.text_shapes.lookup(key)
    _digit_answer(cache, DIGIT_TEXT.format(*then))


def test_without_parse_counts_and_files_nothing_until_taken() -> None:
    """The fast path may decline an answer (a refusal, a dry run...): its statement is
    then looked up by get_or_analyse, so the peek itself must count nothing, or the
    cache metrics would count that statement twice."""
    cache = _filed(POLICY, BASE)
    known = BASE.replace("10", "11")
    cache.get_or_analyse(known)
    hits, misses, size = cache.hits, cache.misses, len(cache)
    for sql in (known, BASE.replace("10", "12")):  # a cached text, then a new one by its shape
        found = cache.without_parse(sql, sql.encode())
        assert found is not None
        assert (cache.hits, cache.misses, len(cache)) == (hits, misses, size)
    found = cache.without_parse(known, known.encode())
    assert found is not None
    assert found[1]  # the text itself is cached
    cache.take(known, *found)
    assert (cache.hits, cache.misses, cache.last_hit) == (hits + 1, misses, True)
    new = BASE.replace("10", "13")
    found = cache.without_parse(new, new.encode())
    assert found is not None
    assert not found[1]
    cache.take(new, *found)
    assert (cache.hits, cache.misses, len(cache)) == (hits + 1, misses + 1, size + 1)
    assert not cache.last_hit
    # Declined, then the general path: one count, as get_or_analyse alone.
    other = BASE.replace("10", "14")
    assert cache.without_parse(other, other.encode()) is not None
    cache.get_or_analyse(other)
    assert (cache.hits, cache.misses) == (hits + 1, misses + 2)


# --- the lane's checks (TextShapes.lane_program; _lane.c's shape_fits) -----------------------

ACME = b"'acme'"


def _passes(checks: bytes, text: bytes) -> bool:
    """The checks as _lane.c's shape_fits reads them (tests/unit/test_lane.py holds
    the C code to this reading of int4/numeric and of the tenant literal)."""
    words = array.array("I")
    words.frombytes(checks)
    for at in range(0, len(words), 3):
        check, start, end = words[at : at + 3]
        if check == LANE_DIGIT:
            fits = start < len(text) and text[start] == end
        elif check in (LANE_INT4, LANE_NUMERIC):
            token = text[start:end].decode("ascii", "replace")
            fits = re.fullmatch(r"-?[0-9]+", token) is not None and (_kind(token) in "iI") == (
                check == LANE_INT4
            )
        else:
            assert check == LANE_TENANT
            fits = text[start:end] == ACME
        if not fits:
            return False
    return True


def _program(cache: AnalysisCache, sql: str) -> bytes | None:
    encoded = sql.encode()
    return cache.text_shapes.lane_program(encoded, digits_of(encoded), ACME)


def test_the_lanes_checks_hold_a_text_to_its_text_key_and_tenant_literal() -> None:
    cache = _filed(POLICY, BASE)
    checks = _program(cache, BASE)
    assert checks is not None
    assert _passes(checks, BASE.encode())
    taught = cache.text_shapes.lookup_bytes(BASE.encode())
    for number in ("11", "99", "00"):
        other = BASE.replace("10", number)
        assert _passes(checks, other.encode())
        assert cache.text_shapes.lookup_bytes(other.encode()) is taught
    # Another tenant's literal: another digit key (and the checks would fail it).
    assert not _passes(checks, BASE.replace("acme", "gbex").encode())
    assert _program(cache, BASE.replace("acme", "gbex")) is None
    assert _program(cache, BASE.replace("10", "12")) is not None
    # Not filed under a digit key: no checks.
    assert _program(AnalysisCache(POLICY), BASE) is None


LANE_TEXT = "SELECT x FROM t{} WHERE a = {} AND b = {}"
lane_literals = st.sampled_from(["'acme'", "'acme'", "'gbex'", "'acm1'"]) | st.sampled_from(
    ["7", "12", "-3", "2147483647", "2147483648", "0002147483648", "99999999999"]
)


@settings(max_examples=300, deadline=None)
@given(
    st.tuples(st.integers(1, 4), lane_literals, lane_literals),
    st.lists(st.tuples(st.integers(1, 4), lane_literals, lane_literals), max_size=5),
)
def test_a_text_that_passes_the_lanes_checks_has_the_taught_texts_analysis(
    learnt: tuple[int, str, str], then: list[tuple[int, str, str]]
) -> None:
    """What lets the lane allow a text by its bytes: a text of the taught text's digit
    key that passes the checks gets, from the digit key, the very analysis the
    taught text got, which is also a fresh analysis of it."""
    taught = LANE_TEXT.format(*learnt)
    cache = _filed(DIGIT_TABLES, taught)
    checks = _program(cache, taught)
    if checks is None:
        return
    assert _passes(checks, taught.encode())
    analysis = cache.text_shapes.lookup_bytes(taught.encode())
    assert analysis is not None
    for parts in then:
        sql = LANE_TEXT.format(*parts).encode()
        if digits_of(sql) != digits_of(taught.encode()) or not _passes(checks, sql):
            continue
        assert cache.text_shapes.lookup_bytes(sql) is analysis
        assert analysis == analyse_sql(sql.decode(), DIGIT_TABLES)


def test_generated_lane_checks_are_exercised() -> None:
    """The property above is not vacuous: the checks pass texts with new values."""
    taught = LANE_TEXT.format(1, "'acme'", "12")
    cache = _filed(DIGIT_TABLES, taught)
    checks = _program(cache, taught)
    assert checks is not None
    assert _passes(checks, LANE_TEXT.format(1, "'acme'", "47").encode())
    assert not _passes(checks, LANE_TEXT.format(2, "'acme'", "47").encode())  # t2: scoped by b
    # Ten digits: int4 or numeric by value, under one digit key.
    taught = LANE_TEXT.format(1, "'acme'", "1000000000")
    cache = _filed(DIGIT_TABLES, taught)
    checks = _program(cache, taught)
    assert checks is not None
    assert _passes(checks, LANE_TEXT.format(1, "'acme'", "2147483647").encode())
    numeric = LANE_TEXT.format(1, "'acme'", "2147483648").encode()
    assert digits_of(numeric) == digits_of(taught.encode())
    assert not _passes(checks, numeric)


def test_file_shaped_counts_and_files_as_get_or_analyse_would() -> None:
    """What the lane has the cache do for a text it allowed by its shape: what
    get_or_analyse does for a new text its shape answers (a miss, a text-shape hit,
    the text filed); a text the cache holds, or a message known by its bytes, is
    declined untouched (the general path counts those as hits)."""
    cache = _filed(POLICY, BASE)
    reference = _filed(POLICY, BASE)
    new = BASE.replace("10", "21")
    analysis = cache.text_shapes.lookup_bytes(new.encode())
    assert analysis is not None

    def counts(of: AnalysisCache) -> tuple[int, ...]:
        return of.hits, of.misses, of.text_shapes.hits, len(of)

    before, reference_before = counts(cache), counts(reference)
    assert cache.file_shaped(new, b"Q...", analysis)
    assert reference.get_or_analyse(new) == analysis
    grew = [after - was for after, was in zip(counts(cache), before, strict=True)]
    assert grew == [0, 1, 1, 1]
    assert grew == [
        after - was for after, was in zip(counts(reference), reference_before, strict=True)
    ]
    assert cache.get_or_analyse(new) is analysis  # filed: a hit now
    filed = counts(cache)
    assert not cache.file_shaped(new, b"Q...", analysis)
    other = BASE.replace("10", "22")
    cache.known_messages[b"Q-other"] = (other, analysis, "select", frozenset({"acme"}))
    assert not cache.file_shaped(other, b"Q-other", analysis)
    assert counts(cache) == filed
