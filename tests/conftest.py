"""Shared test set-up: deterministic seeds, and CUDA tests skipped cleanly without a GPU."""
from __future__ import annotations

import os

import pytest
import torch

collect_ignore: list[str] = []
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    # Without a GPU the Triton kernels run only in the interpreter, which must be switched on before
    # triton is imported: kernels/test_hashgrid.py runs this file in a child process that sets it.
    collect_ignore.append("kernels/test_hashgrid_triton.py")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
