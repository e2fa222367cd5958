"""Fixtures for the training layer's tests: the synthetic data stand-in (synthetic.py) installed in epamx.data,
and one intra-op thread (the machines running these are small and shared; results must not depend on it)."""
import pytest
import torch

import synthetic


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def synthetic_data(monkeypatch):
    synthetic.install(monkeypatch)
    return synthetic
