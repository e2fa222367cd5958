"""Fixtures for the training layer's tests: the synthetic data stand-in (synthetic.py) installed in epamx.data."""
import pytest

import synthetic


@pytest.fixture
def synthetic_data(monkeypatch):
    synthetic.install(monkeypatch)
    return synthetic
