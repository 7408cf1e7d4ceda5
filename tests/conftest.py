"""Shared fixtures."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny ops: one torch thread is fastest, and robust on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
