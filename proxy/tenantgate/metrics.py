"""Prometheus metrics: every ``tenantgate_*`` series and how the proxy records them.

Owns every ``tenantgate_*`` metric (names, types, labels and buckets exactly as
in the product contract), the rule that tenant label values only ever come from
the configuration (anything else is ``unknown``), and removal of a tenant's
series when a reload drops it.  Nothing here touches the global
prometheus_client registry: each :class:`Metrics` owns its own
:class:`CollectorRegistry`.  The HTTP endpoints that serve them live in
:mod:`tenantgate.metrics_http`.

Hot path: :meth:`Metrics.session` binds a :class:`SessionMetrics` once per
client session.  It tallies statements, durations, bytes and rows in plain
integers (no lock, no prometheus call per statement) and adds them to the
labelled prometheus children when anything collects the registry (a scrape,
on the event loop) and when the session closes.

Metrics beyond the contract table (additions, documented in
``docs/operations.md``): ``tenantgate_audit_dropped_total`` and
``tenantgate_rate_limited_total{tenant}``.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Final, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from tenantgate._lane import Lane
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

UNKNOWN_TENANT: Final = "unknown"
COMMANDS: Final = frozenset({"select", "insert", "update", "delete", "other"})
OUTCOMES: Final = frozenset({"allowed", "rejected", "would_reject", "error"})
RELOAD_OUTCOMES: Final = frozenset({"success", "failure"})
UPSTREAM_STATES: Final = ("active", "idle")
# Database latency: half a millisecond (a cached point lookup on loopback) to 30 s.
_bisect_left: Final = bisect.bisect_left  # a C static once compiled
DURATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)

CacheSource = Callable[[], tuple[int, int]]
UpstreamSource = Callable[[], Mapping[str, int]]


class _Discard:
    """Stands in for a child of a tenant that a reload removed: records nothing."""

    __slots__ = ()

    def inc(self, amount: float = 1) -> None:
        return None

    def dec(self, amount: float = 1) -> None:
        return None

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        return None


_DISCARD: Final = _Discard()
_M = TypeVar("_M", Gauge, Counter, Histogram)


_SourceValues = tuple[int, int, Mapping[str, int]]


class _SourceCollector:
    """Parse-cache counters and upstream pool gauges, read from callables at scrape time.

    :meth:`Metrics.render_async` samples the callables on the event loop and pins
    the values for the worker thread that renders, so the callables never run
    off the loop (they may read structures the loop mutates).
    """

    def __init__(self) -> None:
        self.cache_source: CacheSource | None = None
        self.upstream_source: UpstreamSource | None = None
        self._pinned = threading.local()

    def sample(self) -> _SourceValues:
        hits = misses = 0
        if self.cache_source is not None:
            try:
                hits, misses = self.cache_source()
            except Exception:  # a scrape must never fail because of a source
                log.exception("parse cache metrics source failed")
        states: Mapping[str, int] = {}
        if self.upstream_source is not None:
            try:
                states = dict(self.upstream_source())
            except Exception:
                log.exception("upstream connection metrics source failed")
        return hits, misses, states

    @property
    def is_pinned(self) -> bool:
        """This thread renders values sampled on the loop (render_async's worker)."""
        return getattr(self._pinned, "values", None) is not None

    @contextlib.contextmanager
    def pinned(self, values: _SourceValues) -> Iterator[None]:
        self._pinned.values = values
        try:
            yield
        finally:
            self._pinned.values = None

    def describe(self) -> Iterable[Metric]:
        return self._families((0, 0, {}))

    def collect(self) -> Iterable[Metric]:
        values: _SourceValues | None = getattr(self._pinned, "values", None)
        return self._families(values if values is not None else self.sample())

    @staticmethod
    def _families(values: _SourceValues) -> list[Metric]:
        hits, misses, states = values
        hit_family = CounterMetricFamily(
            "tenantgate_parse_cache_hits",
            "Statements whose analysis came from the parse cache.",
            value=hits,
        )
        miss_family = CounterMetricFamily(
            "tenantgate_parse_cache_misses",
            "Statements that had to be parsed and analysed.",
            value=misses,
        )
        upstream = GaugeMetricFamily(
            "tenantgate_upstream_connections",
            "Connections from the proxy to the upstream database, by state.",
            labels=["state"],
        )
        for state in UPSTREAM_STATES:
            upstream.add_metric([state], states.get(state, 0))
        return [hit_family, miss_family, upstream]


class _Flusher:
    """First collector of the registry: adds every live session's tallies first.

    Collecting on the event loop (a test, :meth:`Metrics.render`) flushes inline;
    :meth:`Metrics.render_async` flushes on the loop and pins the sources, so the
    worker thread that renders never touches tallies the loop is writing.
    """

    def __init__(self, metrics: Metrics, sources: _SourceCollector) -> None:
        self._metrics = metrics
        self._sources = sources

    def collect(self) -> Iterable[Metric]:
        if not self._sources.is_pinned:
            self._metrics.flush()
        return ()


class _Exposition:
    """What ``/metrics`` serves: the registry without ``*_created`` samples.

    prometheus_client adds a ``<name>_created`` timestamp per counter and
    histogram child; Prometheus does not use it from the text format, and it
    would double the payload and add names outside the contract.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterable[Metric]:
        for family in self._registry.collect():
            if family.type in _HAS_CREATED:
                family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


_HAS_CREATED: Final = frozenset({"counter", "histogram", "summary", "gaugehistogram"})


class Metrics:
    """All tenantgate metrics, in a registry of their own."""

    def __init__(self, tenants: Iterable[str], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        reg = self.registry
        self._live: set[SessionMetrics] = set()
        self._sources = _SourceCollector()
        self._flusher = _Flusher(self, self._sources)
        reg.register(self._flusher)
        self._client_connections = Gauge(
            "tenantgate_client_connections",
            "Client connections currently open, by tenant.",
            ["tenant"],
            registry=reg,
        )
        self._statements = Counter(
            "tenantgate_statements",
            "Statements received from clients, by tenant, command and outcome.",
            ["tenant", "command", "outcome"],
            registry=reg,
        )
        self._statement_duration = Histogram(
            "tenantgate_statement_duration_seconds",
            "Time from the client's message to the upstream's completion of the statement.",
            ["tenant", "command"],
            buckets=DURATION_BUCKETS,
            registry=reg,
        )
        self._rejections = Counter(
            "tenantgate_rejections",
            "Statements rejected (or that would be in dry_run), by tenant and rule.",
            ["tenant", "reason"],
            registry=reg,
        )
        self._auth_failures = Counter(
            "tenantgate_auth_failures",
            "Failed client logins, by reason.",
            ["reason"],
            registry=reg,
        )
        self._bytes = Counter(
            "tenantgate_bytes",
            "Protocol bytes between clients and the proxy (in: from the client).",
            ["tenant", "direction"],
            registry=reg,
        )
        self._rows = Counter(
            "tenantgate_rows",
            "Rows returned or affected by completed statements, by tenant.",
            ["tenant"],
            registry=reg,
        )
        self._config_reloads = Counter(
            "tenantgate_config_reloads",
            "Policy reloads, by outcome.",
            ["outcome"],
            registry=reg,
        )
        self._audit_dropped = Counter(
            "tenantgate_audit_dropped",
            "Audit log events dropped because the audit queue was full or a write failed.",
            registry=reg,
        )
        self._rate_limited = Counter(
            "tenantgate_rate_limited",
            "Statements delayed by the tenant's queries_per_second token bucket.",
            ["tenant"],
            registry=reg,
        )
        reg.register(self._sources)
        self._exposition = _Exposition(reg)
        for outcome in sorted(RELOAD_OUTCOMES):
            self._config_reloads.labels(outcome)
        self._tenant_metrics: tuple[Gauge | Counter | Histogram, ...] = (
            self._client_connections,
            self._statements,
            self._statement_duration,
            self._rejections,
            self._bytes,
            self._rows,
            self._rate_limited,
        )
        # Every label tuple created per tenant-labelled metric, so a removed
        # tenant's series can be removed from each of them.
        self._series: dict[Gauge | Counter | Histogram, set[tuple[str, ...]]] = {
            metric: set() for metric in self._tenant_metrics
        }
        self._tenants: frozenset[str] = frozenset()
        self.set_tenants(tenants)

    # --- tenants ---------------------------------------------------------------------

    @property
    def tenants(self) -> frozenset[str]:
        return self._tenants

    def tenant_label(self, tenant: str | None) -> str:
        """``tenant`` if it is configured, else ``unknown``."""
        if tenant is not None and tenant in self._tenants:
            return tenant
        return UNKNOWN_TENANT

    def set_tenants(self, tenants: Iterable[str]) -> None:
        """Adopt the tenant list of a (re)loaded policy.

        Every series of a tenant no longer listed is removed from every
        tenant-labelled metric; sessions still bound to it record nothing more.
        New tenants get their always-present series (connections, bytes, rows)
        at zero so dashboards show them before their first connection.
        """
        new = frozenset(tenants)
        removed = self._tenants - new
        self._tenants = new
        if removed:
            for metric, series in self._series.items():
                gone = {labels for labels in series if labels[0] in removed}
                for labels in gone:
                    with contextlib.suppress(KeyError):
                        metric.remove(*labels)
                series.difference_update(gone)
        for tenant in sorted(new | {UNKNOWN_TENANT}):
            self._child(self._client_connections, tenant)
            self._child(self._rows, tenant)
            self._child(self._bytes, tenant, "in")
            self._child(self._bytes, tenant, "out")

    def _child(self, metric: _M, *labels: str) -> _M | _Discard:
        """The labelled child (created and remembered), or a discard sink for a removed tenant."""
        tenant = labels[0]
        if tenant != UNKNOWN_TENANT and tenant not in self._tenants:
            return _DISCARD
        self._series[metric].add(labels)
        # (mypyc's build, which has no prometheus_client stubs, cannot tell the child's type.)
        return metric.labels(*labels)  # type: ignore[return-value, unused-ignore]

    # --- sessions ----------------------------------------------------------------------

    def session(self, tenant: str | None) -> SessionMetrics:
        """Children bound for one client session of ``tenant`` (unknown tenants -> ``unknown``)."""
        return SessionMetrics(self, self.tenant_label(tenant))

    # --- process-wide ------------------------------------------------------------------

    def auth_failure(self, reason: str) -> None:
        """A failed login; ``reason`` must come from a small fixed set (e.g. ``password``)."""
        self._auth_failures.labels(reason).inc()

    def config_reload(self, outcome: str) -> None:
        if outcome not in RELOAD_OUTCOMES:
            raise ValueError(f"reload outcome must be one of {sorted(RELOAD_OUTCOMES)}")
        self._config_reloads.labels(outcome).inc()

    def audit_dropped(self, n: int = 1) -> None:
        """``n`` audit events were dropped (pass as ``AuditLog(on_drop=...)``)."""
        if n > 0:
            self._audit_dropped.inc(n)

    def set_cache_source(self, source: CacheSource | None) -> None:
        """``source()`` returns the parse cache's cumulative ``(hits, misses)``."""
        self._sources.cache_source = source

    def set_upstream_source(self, source: UpstreamSource | None) -> None:
        """``source()`` returns ``{"active": n, "idle": m}`` for the upstream pool."""
        self._sources.upstream_source = source

    def flush(self) -> None:
        """Add every live session's tallies to the prometheus series (on the loop)."""
        for session in list(self._live):
            session.flush()

    def render(self) -> bytes:
        """The exposition in Prometheus text format 0.0.4 (runs the sources inline)."""
        return generate_latest(self._exposition)

    async def render_async(self) -> bytes:
        """:meth:`render` in a worker thread, so a large scrape never stalls the event loop.

        The source callables are sampled and the session tallies flushed here, on the loop.
        """
        values = self._sources.sample()
        self.flush()
        return await asyncio.to_thread(self._render_pinned, values)

    def _render_pinned(self, values: _SourceValues) -> bytes:
        with self._sources.pinned(values):
            return generate_latest(self._exposition)


class SessionMetrics:
    """One session's metrics: connection gauge and rejections directly, the rest tallied.

    Statements, durations, bytes and rows are the per-statement path: they are
    counted in plain integers here and added to the prometheus children by
    :meth:`flush` (a collect of the registry, or :meth:`closed`).
    """

    __slots__ = (
        "__weakref__",
        "_bytes_in",
        "_bytes_out",
        "_connections",
        "_dirty",
        "_durations",
        "_lane",
        "_metrics",
        "_rate_limited",
        "_rejections",
        "_rows",
        "_statements",
        "_tallies",
        "_tally_bytes_in",
        "_tally_bytes_out",
        "_tally_rows",
        "tenant",
    )

    def __init__(self, metrics: Metrics, tenant: str) -> None:
        self._metrics = metrics
        self.tenant = tenant
        self._connections = metrics._child(metrics._client_connections, tenant)
        self._bytes_in = metrics._child(metrics._bytes, tenant, "in")
        self._bytes_out = metrics._child(metrics._bytes, tenant, "out")
        self._rows = metrics._child(metrics._rows, tenant)
        self._rate_limited: Counter | _Discard | None = None
        self._statements: dict[tuple[str, str], Counter | _Discard] = {}
        self._durations: dict[str, Histogram | _Discard] = {}
        self._rejections: dict[str, Counter | _Discard] = {}
        self._tally_bytes_in = 0
        self._tally_bytes_out = 0
        self._tally_rows = 0
        self._tallies: dict[str, _CommandTally] = {}  # statements by command
        self._dirty = False  # tallies not yet flushed (then it is in Metrics._live)
        self._lane: Lane | None = None  # the session's steady-state lane, if any

    def attach_lane(self, lane: Lane) -> None:
        """Take the lane's tallies at every flush; it marks this dirty when it tallies."""
        self._lane = lane
        lane.report_to(self._mark, DURATION_BUCKETS)

    def _mark(self) -> None:
        self._dirty = True
        self._metrics._live.add(self)

    def opened(self) -> None:
        self._connections.inc()

    def closed(self) -> None:
        self.flush()
        self._connections.dec()

    def statement(self, command: str, outcome: str, duration_s: float | None) -> None:
        """One statement: count it; tally its duration when it ran upstream."""
        if outcome not in OUTCOMES:
            raise ValueError(f"statement outcome must be one of {sorted(OUTCOMES)}")
        tally = self._tally(command)
        if outcome == "allowed":
            tally.allowed += 1
        elif outcome == "error":
            tally.error += 1
        elif outcome == "rejected":
            tally.rejected += 1
        else:
            tally.would_reject += 1
        if not self._dirty:
            self._mark()
        if duration_s is not None:
            tally.buckets[_bisect_left(DURATION_BUCKETS, duration_s)] += 1
            tally.seconds += duration_s
            tally.timed = True

    def flush(self) -> None:
        """Add the tallies to the labelled prometheus children and reset them."""
        if not self._dirty:
            return
        self._dirty = False
        self._metrics._live.discard(self)
        if self._lane is not None:
            self._take_lane(self._lane)
        if self._tally_bytes_in:
            self._bytes_in.inc(self._tally_bytes_in)
            self._tally_bytes_in = 0
        if self._tally_bytes_out:
            self._bytes_out.inc(self._tally_bytes_out)
            self._tally_bytes_out = 0
        if self._tally_rows:
            self._rows.inc(self._tally_rows)
            self._tally_rows = 0
        if self._tallies:
            tallies, self._tallies = self._tallies, {}
            for command, tally in tallies.items():
                for outcome, count in tally.counts():
                    counter = self._statements.get((command, outcome))
                    if counter is None:
                        counter = self._statements[(command, outcome)] = self._bind_statement(
                            command, outcome
                        )
                    counter.inc(count)
                if tally.timed:
                    histogram = self._durations.get(command)
                    if histogram is None:
                        histogram = self._durations[command] = self._metrics._child(
                            self._metrics._statement_duration, self.tenant, _command(command)
                        )
                    _add_to_histogram(histogram, tally.buckets, tally.seconds)

    def _tally(self, command: str) -> _CommandTally:
        """``command``'s tally since the last flush (made at its first statement)."""
        tally = self._tallies.get(command)
        if tally is None:
            tally = self._tallies[command] = _CommandTally()
        return tally

    def _take_lane(self, lane: Lane) -> None:
        """Add what the lane tallied (allowed statements, timed) to the tallies."""
        bytes_in, bytes_out, rows, commands = lane.take()
        self._tally_bytes_in += bytes_in
        self._tally_bytes_out += bytes_out
        self._tally_rows += rows
        for command, allowed, buckets, seconds in commands:
            tally = self._tally(command)
            tally.allowed += allowed
            counts = tally.buckets
            for index, count in enumerate(buckets):
                counts[index] += count
            tally.seconds += seconds
            tally.timed = True

    def _bind_statement(self, command: str, outcome: str) -> Counter | _Discard:
        return self._metrics._child(
            self._metrics._statements, self.tenant, _command(command), outcome
        )

    def rejected(self, reason: str) -> None:
        """A rejection by rule ``reason`` (a rule id: a small fixed set, never message text)."""
        counter = self._rejections.get(reason)
        if counter is None:
            counter = self._rejections[reason] = self._metrics._child(
                self._metrics._rejections, self.tenant, reason
            )
        counter.inc()

    def rate_limited(self) -> None:
        """A statement had to wait for the tenant's token bucket."""
        if self._rate_limited is None:
            self._rate_limited = self._metrics._child(self._metrics._rate_limited, self.tenant)
        self._rate_limited.inc()

    def bytes_in(self, n: int) -> None:
        if not self._dirty:
            self._mark()
        self._tally_bytes_in += n

    def bytes_out(self, n: int) -> None:
        if not self._dirty:
            self._mark()
        self._tally_bytes_out += n

    def rows(self, n: int) -> None:
        if not self._dirty:
            self._mark()
        self._tally_rows += n


class _CommandTally:
    """One command's statements since the last flush: a count per outcome, durations.

    Native attributes (a compiled class): counting a statement is an
    increment, not a tuple key built and looked up per statement.
    """

    __slots__ = ("allowed", "buckets", "error", "rejected", "seconds", "timed", "would_reject")

    def __init__(self) -> None:
        self.allowed = 0
        self.error = 0
        self.rejected = 0
        self.would_reject = 0
        # Observations per bucket (not cumulative), the last one above the largest bound.
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.seconds = 0.0
        self.timed = False

    def counts(self) -> list[tuple[str, int]]:
        """(outcome, count) for every outcome counted."""
        pairs = [
            ("allowed", self.allowed),
            ("error", self.error),
            ("rejected", self.rejected),
            ("would_reject", self.would_reject),
        ]
        return [(outcome, count) for outcome, count in pairs if count]


def _add_to_histogram(histogram: Histogram | _Discard, buckets: list[int], seconds: float) -> None:
    """Add tallied observations (``buckets``, summing to ``seconds``) to a histogram child.

    prometheus_client has no public "observe n at once"; its children keep one
    value per bucket (``_buckets``, not cumulative) and ``_sum``, which is what
    ``observe`` increments.  tests/unit/test_metrics.py checks this against
    ``observe`` so a prometheus_client that changes them fails loudly.
    """
    if isinstance(histogram, _Discard):
        return
    counts = histogram._buckets
    for index, count in enumerate(buckets):
        if count:
            counts[index].inc(count)
    histogram._sum.inc(seconds)


def _command(command: str) -> str:
    command = command.lower()
    return command if command in COMMANDS else "other"
