"""Shared fixtures for the analyser tests (the corpus policy and helpers)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_PROXY = Path(__file__).resolve().parents[2] / "proxy"
if str(_PROXY) not in sys.path:  # the package may not be installed in the venv
    sys.path.insert(0, str(_PROXY))

from analysis_corpus import POLICY  # noqa: E402

from tenantgate.analysis import AnalysisPolicy  # noqa: E402


@pytest.fixture
def policy() -> AnalysisPolicy:
    return POLICY
