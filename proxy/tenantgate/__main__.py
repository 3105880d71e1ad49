"""Entry point for ``python -m tenantgate``."""

from tenantgate.cli import main

raise SystemExit(main())
