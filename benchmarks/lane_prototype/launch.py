"""``tenantgate`` with the lane prototype patched in (see README.md here).

Run by ``ab.py`` with ``TENANTGATE_PURE_PYTHON=1`` and the built ``_lane``
extension on ``PYTHONPATH``.
"""

import sys

import tenantgate

if "PURE_PYTHON" not in tenantgate.COMPILED_WHY:
    sys.exit("launch.py needs TENANTGATE_PURE_PYTHON=1 (compiled classes cannot be patched)")

import lanepatch  # noqa: F401  (patches tenantgate.session on import)

from tenantgate.cli import main

sys.exit(main())
