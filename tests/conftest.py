"""Shared test settings: deterministic, single-threaded-friendly, CPU only."""

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_datasets() -> Path:
    """../shared/datasets beside the checkout (CI has it there)."""
    if not SHARED_DATASETS.is_dir():
        pytest.fail(f"expected the shared datasets at {SHARED_DATASETS}")
    return SHARED_DATASETS
