"""Types of the C extension ``_lane.c`` (the steady-state lane; see its comment)."""

from collections.abc import Callable
from typing import Any

TOOK_CONTROL: int
TOOK_SPLICED: int

def clock() -> float: ...

class Lane:
    outstanding: bool
    served: int
    learnt: int
    def __init__(
        self,
        upstream_write: Callable[[bytes], object],
        client_write: Callable[[bytes], object],
        materialize: Callable[[object, bool, float, bytes | None], None],
        tenant: bytes,
        max_message: int,
        materialize_query: Callable[[str, str, float, bool], None] | None = None,
        known_queries: bool = False,
        splice: bytes | None = None,
    ) -> None: ...
    def client(self, data: bytes, in_block: bool, splice: bool = False) -> int: ...
    def upstream(self, data: bytes) -> str | None: ...
    def hand_over(self) -> None: ...
    def learn(
        self,
        name: bytes,
        numbers: tuple[int, ...],
        info: object,
        command: str,
        plain: bool,
        control: bool = False,
    ) -> bool: ...
    def learn_parse(
        self,
        payload: bytes,
        numbers: tuple[int, ...],
        info: object,
        command: str,
        cache: object,
        plain: bool,
        control: bool = False,
        prepared: object = None,
    ) -> bool: ...
    def learn_queries(
        self,
        known: dict[bytes, tuple[str, Any, str, frozenset[str]]],
        controls: dict[bytes, tuple[str, Any, str, frozenset[str]]],
        tenant_only: frozenset[str],
        cache: object,
    ) -> None: ...
    def learn_shapes(
        self,
        routes: dict[bytes, tuple[bytes, str, Any]],
        file_shaped: Callable[[str, bytes, Any], bool],
    ) -> None: ...
    def forget(self) -> None: ...
    def attach(
        self,
        portals: dict[str, Any],
        max_portals: int,
        known_parses: dict[bytes, Any] | None = None,
        confirm: Callable[[Any], None] | None = None,
    ) -> None: ...
    def report_to(self, mark: Callable[[], None], bounds: tuple[float, ...]) -> None: ...
    def take(
        self,
    ) -> tuple[int, int, int, tuple[tuple[str, int, tuple[int, ...], float], ...]]: ...
    def release(self) -> None: ...
