"""tenantgate: fail-closed tenant isolation for PostgreSQL, as a wire-protocol proxy.

The package owns nothing itself; see ``docs/architecture.md`` for the modules.
"""

__version__ = "0.1.0"
