"""Shared test set-up: one torch thread. The tests run tiny tensors, where a second thread only adds
synchronisation (on a busy 2-core machine, tiny matmuls took 2-24 ms instead of 10 us)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
