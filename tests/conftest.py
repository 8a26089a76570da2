"""Shared fixtures (helpers live in tests/helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers import write_tiny_dataset

torch.set_num_threads(1)  # 2 shared cores: one thread per test process, reproducible numbers


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    root = tmp_path / "data"
    write_tiny_dataset(root)
    return root
