"""Route a tenantgate session's W1-prepared steady state through the C prototype.

Imported by ``launch.py`` into a tenantgate process running as pure Python
(``TENANTGATE_PURE_PYTHON=1``: compiled classes cannot be patched).  A
measurement instrument only: see README.md here.
"""

from __future__ import annotations

import time
from typing import Any

from _lane import Lane  # type: ignore[import-not-found]

from tenantgate import enforcement, session
from tenantgate.protocol.frontend import Bind
from tenantgate.tracker import Kind, Pending

# Per inspector (by id): statement name -> index of its one tenant parameter.
_STATEMENTS: dict[int, dict[bytes, int]] = {}
_client_data = session.Session.client_data
_upstream_data = session.Session.upstream_data
_inspect_bind = enforcement.PolicyInspector.inspect_bind


def inspect_bind(self: enforcement.PolicyInspector, bind: Bind) -> Any:
    """The inspector's check, and: teach the lane a statement it may pass alone."""
    error = _inspect_bind(self, bind)
    statements = _STATEMENTS.get(id(self))
    if error is None and statements is not None and bind.portal == "" and bind.statement:
        slot = self._statements.get(bind.statement)
        if slot is not None and slot.confirmed is not None and not slot.pending:
            params = slot.confirmed.tenant_params()
            if len(params) == 1 and not slot.confirmed.info.would_reject:
                statements[bind.statement.encode()] = params[0] - 1
    return error


def _lane(self: session.Session) -> Any:
    lane = getattr(self, "_lane_obj", None)
    if lane is None:
        statements: dict[bytes, int] = {}
        _STATEMENTS[id(self.inspector)] = statements
        tracker = self.tracker

        def materialize(describe: bool) -> None:
            # The entries the Python path would have made for the request the lane
            # forwarded (its answer did not come as one exact chunk).
            tracker.expect(Pending(Kind.BIND))
            if describe:
                tracker.expect(Pending(Kind.DESCRIBE_PORTAL))
            entry = Pending(Kind.EXECUTE, command="select")
            entry.started = time.perf_counter()
            tracker.expect(entry)
            tracker.expect(Pending(Kind.SYNC))

        lane = Lane(
            self._upstream_transport.write,
            self._client_transport.write,
            statements,
            self.info.tenant.encode(),
            materialize,
        )
        self._lane_obj = lane  # type: ignore[attr-defined]
    return lane


def client_data(self: session.Session, data: bytes) -> None:
    if (
        self.tracker.idle
        and self.injector is None
        and self.rate_limit is None
        and not self._deferred
        and not len(self._client_held)
        and not self._finished.done()
        and _lane(self).client(data)
    ):
        return
    _client_data(self, data)


def upstream_data(self: session.Session, data: bytes) -> None:
    lane = getattr(self, "_lane_obj", None)
    if lane is not None and not len(self._upstream_held) and lane.upstream(data):
        return
    _upstream_data(self, data)


session.Session.client_data = client_data  # type: ignore[method-assign]
session.Session.upstream_data = upstream_data  # type: ignore[method-assign]
enforcement.PolicyInspector.inspect_bind = inspect_bind  # type: ignore[method-assign]
