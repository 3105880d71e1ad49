"""``python -m tenantgate.demo``: the same as ``tenantgate demo``."""

from tenantgate.demo.run import main

raise SystemExit(main())
