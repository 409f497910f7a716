"""hypothesis when installed (``pip install -e '.[test]'``, which ``make test`` ensures);
otherwise stand-ins so that test modules still collect and only the property-based
tests skip."""
from __future__ import annotations

import pytest

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - exercised only in a venv without the test extra
    _SKIP = pytest.mark.skip(reason="hypothesis is not installed (pip install -e '.[test]')")

    def given(*args, **kwargs):
        return _SKIP

    def settings(*args, **kwargs):
        return lambda f: f

    class _Strategies:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    st = _Strategies()

__all__ = ["given", "settings", "st"]
