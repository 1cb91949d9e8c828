"""Shared fixtures. `one_thread`: tiny models on a shared 2-core machine run faster on one torch thread."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
