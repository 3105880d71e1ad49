"""The analysis cache: LRU by statement text, bounded by entry count.

Owns :class:`AnalysisCache`.  Analyses are tenant independent, so one cache
serves every tenant and connection; the policy is fixed at construction (build
a new cache on policy reload).  Not thread-safe: the proxy uses it from its
event loop only.
"""

from __future__ import annotations

from collections import OrderedDict

from .analyser import CompiledPolicy, analyse_json
from .model import Analysis, AnalysisPolicy, Rejected
from .parse import parse_json
from .shapes import ShapeCache, probe_text, qualifies
from .textshapes import TextKey, TextShapes, text_key


class AnalysisCache:
    """LRU cache of :func:`analyse_sql` results keyed by the exact SQL text."""

    __slots__ = (
        "_compiled",
        "_entries",
        "_last_key",
        "hits",
        "known_controls",
        "known_messages",
        "lane_routes",
        "last_hit",
        "maxsize",
        "misses",
        "policy",
        "shapes",
        "text_shapes",
    )

    def __init__(self, policy: AnalysisPolicy, maxsize: int = 10_000) -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be at least 1")
        self.policy = policy
        self.maxsize = maxsize
        self._compiled = CompiledPolicy(policy)
        self._entries: OrderedDict[str, Analysis] = OrderedDict()
        # Whole Query messages already allowed once (see PolicyInspector.known_query):
        # message bytes -> (text, analysis, metric label, tenant constants).  Bounded
        # like the LRU; emptied when full (cheaper than LRU bookkeeping per hit).
        self.known_messages: dict[bytes, tuple[str, Analysis, str, frozenset[str]]] = {}
        # Those of them that are one transaction-control statement (the same entries):
        # the lanes may take these in rls/both mode too, where nothing goes before them.
        self.known_controls: dict[bytes, tuple[str, Analysis, str, frozenset[str]]] = {}
        # Text shapes the sessions' lanes may allow by their digit keys: the tenant's
        # string literal + a digit key -> (the checks, the metric label, the analysis).
        # Filled by PolicyInspector._teach_shape, bounded like the LRU.
        self.lane_routes: dict[bytes, tuple[bytes, str, Analysis]] = {}
        self.shapes = ShapeCache(maxsize)
        self.text_shapes = TextShapes(maxsize)
        self.hits = 0
        self.misses = 0
        self.last_hit = False  # whether the latest get_or_analyse found the text
        # without_parse's text key of a text it could not answer, for _analyse to reuse.
        self._last_key: tuple[str, TextKey | None] | None = None

    def get_or_analyse(self, sql: str) -> Analysis:
        """The cached analysis of ``sql``, analysing (and caching) it on a miss."""
        found = self._hit(sql)
        if found is not None:
            return found
        return self._file(sql, self._analyse(sql))

    def without_parse(self, sql: str, encoded: bytes | None = None) -> tuple[Analysis, bool] | None:
        """What :meth:`get_or_analyse` would return, if it needs no parse (the text, or
        its text shape, is known), with whether the text itself is cached; else None.

        Nothing is counted or filed here: :meth:`take` does that for an answer the
        caller uses.  An answer the caller declines is then looked up again by
        get_or_analyse (the general path), which counts it once, as it would have
        alone.  ``encoded``: ``sql`` in UTF-8, if the caller has it (lets the
        text-shape level try the text's digit key before its literal scan).
        """
        found = self._entries.get(sql)
        if found is not None:
            return found, True
        if encoded is not None:
            found = self.text_shapes.lookup_bytes(encoded)
            if found is not None:
                return found, False
        literals = text_key(sql)
        self._last_key = (sql, literals)
        if literals is None:
            return None
        found = self.text_shapes.lookup(literals)
        return None if found is None else (found, False)

    def take(self, sql: str, analysis: Analysis, cached: bool) -> None:
        """Count and keep an answer of :meth:`without_parse` as get_or_analyse would:
        a hit for a cached text, else a miss that files it."""
        if cached:
            self._count_hit(sql)
        else:
            self._file(sql, analysis)

    def file_shaped(self, sql: str, message: bytes, analysis: Analysis) -> bool:
        """What get_or_analyse does for a text it does not hold whose text shape
        answers ``analysis`` (the session's lane found it by its digit key): count the
        shape's hit and a miss, and file the text.  False, doing nothing, if the text
        is cached or its Query ``message`` is known by its bytes: the caller then
        goes the general way (which counts a hit)."""
        if sql in self._entries or message in self.known_messages:
            return False
        self.text_shapes.hits += 1
        self._file(sql, analysis)
        return True

    def _hit(self, sql: str) -> Analysis | None:
        found = self._entries.get(sql)
        if found is not None:
            self._count_hit(sql)
        return found

    def _count_hit(self, sql: str) -> None:
        """Count a hit on the cached text ``sql`` (the most recently used now)."""
        self.hits += 1
        self.last_hit = True
        self._entries.move_to_end(sql)

    def _file(self, sql: str, result: Analysis) -> Analysis:
        """Count a miss and keep ``result`` as the analysis of ``sql``."""
        self.misses += 1
        self.last_hit = False
        entries = self._entries
        entries[sql] = result
        if len(entries) > self.maxsize:
            entries.popitem(last=False)
        return result

    def _analyse(self, sql: str) -> Analysis:
        """A text the cache has not seen: by its shape if known, else in full (and learn)."""
        last = self._last_key
        self._last_key = None
        if last is not None and last[0] == sql:
            literals = last[1]  # without_parse has tried this text's keys
        else:
            if sql.isascii():  # (a digit key is only ever made of an ASCII text)
                found = self.text_shapes.lookup_bytes(sql.encode("ascii"))
                if found is not None:
                    return found
            literals = text_key(sql)
        if literals is not None:
            found = self.text_shapes.lookup(literals)
            if found is not None:
                return found
        try:
            text = parse_json(sql)
        except Rejected as exc:
            return Analysis((), exc.rejection)
        key, result = self.shapes.lookup(text)
        if result is None:
            result = analyse_json(text, self._compiled)
            if self.shapes.wants_probe(key):
                probe = None
                if qualifies(result):
                    probe_json, count = probe_text(text, result.statements[0].param_count + 1)
                    if count:
                        probe = analyse_json(probe_json, self._compiled)
                self.shapes.learn(key, text, result, probe)
        if literals is not None:
            shape = self.shapes.shape(key)
            if shape is not None:
                self.text_shapes.learn(literals, text, shape)
        return result

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        """Forget every entry (counters are kept)."""
        self._entries.clear()
        self.known_messages.clear()
        self.known_controls.clear()
        self.shapes.clear()
        self.text_shapes.clear()
