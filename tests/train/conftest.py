"""Fixtures for the training layer's tests: the synthetic data stand-in (synthetic.py) installed in epamx.data,
and one intra-op thread (the machines running these are small and shared; results must not depend on it)."""
import pytest

import synthetic
import testkit


@pytest.fixture(autouse=True)
def one_thread():
    with testkit.one_thread():
        yield


@pytest.fixture
def synthetic_data(monkeypatch):
    synthetic.install(monkeypatch)
    return synthetic
