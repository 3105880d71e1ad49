"""The audit log: one PII-free JSON line per rejected (and optionally every) statement.

Owns the :class:`AuditEvent` record, :func:`event_for` (which turns statement
text into its fingerprint and normalized text: every literal replaced by
``$n``, comments dropped, unparseable text never echoed; see
:mod:`tenantgate.analysis.normalize`) and :class:`AuditLog`, whose
:meth:`~AuditLog.record` never blocks: events go into a bounded in-memory
queue, a background task (:meth:`~AuditLog.run`) hands batches to a dedicated
writer thread that formats and writes them, and an overflowing queue drops the
event and reports it through ``on_drop`` (wire it to
:meth:`tenantgate.metrics.Metrics.audit_dropped`).

Line format (keys exactly the :class:`AuditEvent` fields, in that order)::

    {"time": "2025-01-31T12:00:00.123Z", "tenant": "acme", "user": "acme_app",
     "client_addr": "10.0.0.7:51234", "session_id": "3f2a", "command": "select",
     "fingerprint": "a0b1...", "normalized": "SELECT * FROM orders WHERE id = $1",
     "verdict": "rejected", "rule": "missing_tenant_predicate", "duration_ms": null,
     "rows": null}
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import json
import logging
import sys
import threading
import time as _time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import BinaryIO, Final

from tenantgate.analysis.normalize import fingerprint, normalize
from tenantgate.errors import ConfigError

log = logging.getLogger(__name__)

VERDICTS: Final = frozenset({"allowed", "rejected", "would_reject", "error"})
# Verdicts logged even when ``audit.statements`` is false.
ALWAYS_LOGGED: Final = frozenset({"rejected", "would_reject"})
# Normalized text longer than this is cut (after normalization, so no literal can leak).
MAX_NORMALIZED_CHARS: Final = 4096
TRUNCATED_MARK: Final = "..."
# Statement texts up to this size have their fingerprint/normalized form memoised.
_MEMO_MAX_SQL: Final = 8192
_BATCH: Final = 512


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audited statement; the JSON line has exactly these keys."""

    time: float  # seconds since the epoch; written as ISO-8601 UTC
    tenant: str
    user: str
    client_addr: str
    session_id: str
    command: str
    fingerprint: str
    normalized: str
    verdict: str  # allowed | rejected | would_reject | error
    rule: str | None = None
    duration_ms: float | None = None
    rows: int | None = None


def event_for(
    sql: str,
    *,
    tenant: str,
    user: str,
    client_addr: str,
    session_id: str,
    command: str,
    verdict: str,
    rule: str | None = None,
    duration_ms: float | None = None,
    rows: int | None = None,
    time: float | None = None,
) -> AuditEvent:
    """An :class:`AuditEvent` for statement text ``sql``; the text itself is never kept."""
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {sorted(VERDICTS)}")
    fp, normalized = describe_sql(sql)
    return AuditEvent(
        time=_time.time() if time is None else time,
        tenant=tenant,
        user=user,
        client_addr=client_addr,
        session_id=session_id,
        command=command,
        fingerprint=fp,
        normalized=normalized,
        verdict=verdict,
        rule=rule,
        duration_ms=duration_ms,
        rows=rows,
    )


def describe_sql(sql: str) -> tuple[str, str]:
    """``(fingerprint, normalized text)`` of ``sql``, memoised for short texts."""
    if len(sql) <= _MEMO_MAX_SQL:
        return _describe_memo(sql)
    return _describe(sql)


def _describe(sql: str) -> tuple[str, str]:
    normalized = normalize(sql)
    if len(normalized) > MAX_NORMALIZED_CHARS:
        normalized = normalized[:MAX_NORMALIZED_CHARS] + TRUNCATED_MARK
    return fingerprint(sql), normalized


_describe_memo = functools.lru_cache(maxsize=2048)(_describe)


def format_event(event: AuditEvent) -> str:
    """The JSON line (without the newline) for ``event``."""
    when = datetime.fromtimestamp(event.time, UTC).isoformat(timespec="milliseconds")
    return json.dumps(
        {
            "time": when.replace("+00:00", "Z"),
            "tenant": event.tenant,
            "user": event.user,
            "client_addr": event.client_addr,
            "session_id": event.session_id,
            "command": event.command,
            "fingerprint": event.fingerprint,
            "normalized": event.normalized,
            "verdict": event.verdict,
            "rule": event.rule,
            "duration_ms": None if event.duration_ms is None else round(event.duration_ms, 3),
            "rows": event.rows,
        },
        ensure_ascii=False,
        separators=(",", ":"),
    )


class AuditLog:
    """A non-blocking audit log writing JSON lines to stdout or a file.

    Lifecycle: construct (opens the file: a bad path fails fast with
    :class:`ConfigError`), start ``asyncio.create_task(log.run())``, call
    :meth:`record` from the event loop, ``await log.close()`` at shutdown
    (writes what is queued, closes the file).  :meth:`reopen` makes the writer
    reopen the file before its next write (log rotation).
    """

    def __init__(
        self,
        output: str,
        queue_size: int,
        statements: bool,
        on_drop: Callable[[int], None] | None = None,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.output = output
        self.queue_size = queue_size
        self.statements = statements
        self.dropped = 0
        self._on_drop = on_drop
        self._queue: collections.deque[AuditEvent] = collections.deque()
        self._wake = asyncio.Event()
        self._closing = False
        self._closed = False
        self._running = False
        self._stopped = asyncio.Event()
        self._stream: BinaryIO | None = self._open()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tenantgate-audit")
        self._file_lock = threading.Lock()  # the writer thread vs close()
        self._reopen = False
        self._write_failed = False

    # --- producer side (event loop) --------------------------------------------------------

    @property
    def wants_statements(self) -> bool:
        """Whether allowed/error statements are logged (``audit.statements``)."""
        return self.statements

    def record(self, event: AuditEvent) -> None:
        """Queue ``event``; never blocks.  Drops it (and reports the drop) if the queue is full.

        Events whose verdict is not a rejection are ignored unless
        :attr:`wants_statements`; call sites may check it first to skip the work.
        """
        if event.verdict not in ALWAYS_LOGGED and not self.statements:
            return
        if self._closing or len(self._queue) >= self.queue_size:
            self._drop(1)
            return
        self._queue.append(event)
        self._wake.set()

    def _drop(self, n: int) -> None:
        self.dropped += n
        if self._on_drop is not None:
            self._on_drop(n)

    @property
    def pending(self) -> int:
        return len(self._queue)

    def reopen(self) -> None:
        """Reopen the output file before the next write (after logrotate moved it)."""
        self._reopen = True

    # --- writer ----------------------------------------------------------------------------

    async def run(self) -> None:
        """The background writer: run it as a task for the life of the log."""
        if self._running:
            raise RuntimeError("AuditLog.run() is already running")
        self._running = True
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                await self._drain(loop)
                if self._closing:
                    return
        finally:
            self._running = False
            self._stopped.set()

    async def close(self) -> None:
        """Write what is queued, stop :meth:`run` and close the output.  Idempotent."""
        if self._closed:
            return
        self._closing = True
        self._wake.set()
        loop = asyncio.get_running_loop()
        if self._running:
            await self._stopped.wait()
        await self._drain(loop)  # run() was never started, or was cancelled
        if self._closed:  # a concurrent close() finished while we waited
            return
        self._closed = True
        await loop.run_in_executor(self._executor, self._close_stream)
        self._executor.shutdown(wait=False)

    async def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(_BATCH, len(self._queue)))]
            failed = await loop.run_in_executor(self._executor, self._write_batch, batch)
            if failed:
                self._drop(failed)

    # --- writer thread ---------------------------------------------------------------------

    def _open(self) -> BinaryIO | None:
        if self.output == "stdout":
            return None
        try:
            return open(self.output, "ab")
        except OSError as exc:
            raise ConfigError(
                f"audit.output: cannot open {self.output!r} for appending: {exc.strerror}"
            ) from None

    def _file(self) -> BinaryIO:
        if self._reopen or self._stream is None:
            self._reopen = False
            if self._stream is not None:
                with contextlib.suppress(OSError):
                    self._stream.close()
                self._stream = None
            self._stream = open(self.output, "ab")  # noqa: SIM115 - kept open, closed in _close_stream
        return self._stream

    def _write_batch(self, batch: list[AuditEvent]) -> int:
        """Write ``batch``; the number of events lost to a write error (0 on success)."""
        data = "".join(format_event(e) + "\n" for e in batch).encode("utf-8", "backslashreplace")
        with self._file_lock:
            try:
                if self.output == "stdout":
                    _write_stdout(data)
                else:
                    stream = self._file()
                    stream.write(data)
                    stream.flush()
            except (OSError, ValueError) as exc:
                if not self._write_failed:
                    log.error("audit log write to %s failed: %s", self.output, exc)
                self._write_failed = True
                self._reopen = True
                return len(batch)
            if self._write_failed:
                log.warning("audit log writes to %s resumed", self.output)
                self._write_failed = False
            return 0

    def _close_stream(self) -> None:
        with self._file_lock:
            if self._stream is not None:
                with contextlib.suppress(OSError):
                    self._stream.close()
                self._stream = None


def _write_stdout(data: bytes) -> None:
    stream = sys.stdout
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(data.decode("utf-8"))
        stream.flush()
