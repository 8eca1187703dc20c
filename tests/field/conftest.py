"""Field tests run torch on one intra-op thread.

Their tensors are small (a few thousand samples per op), so a second thread buys
little, and on a shared, oversubscribed CPU OpenMP's spinning threads made this
directory ~7x slower (289 s vs 41 s measured side by side on the 2-core dev box).
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
