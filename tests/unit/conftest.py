"""Unit tests run without Ray and without a server: starting either here is a bug in the test."""

import pytest


@pytest.fixture(autouse=True)
def _refuse_ray(monkeypatch):
    try:
        import ray
    except ImportError:  # pragma: no cover
        return

    def refuse(*args, **kwargs):
        raise AssertionError("unit tests must not start Ray; move this test to tests/integration")

    monkeypatch.setattr(ray, "init", refuse)
