"""tenantgate: fail-closed tenant isolation for PostgreSQL, as a wire-protocol proxy.

The package owns nothing itself; see ``docs/architecture.md`` for the modules.
It only decides, before anything else is imported, whether the compiled hot
path is used (see :mod:`tenantgate.compiled`).
"""

from pathlib import Path as _Path

from tenantgate.compiled import choose as _choose

__version__ = "0.1.0"

COMPILED, COMPILED_WHY = _choose(_Path(__file__).parent)
