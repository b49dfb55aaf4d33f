"""Shared test settings: deterministic, single-threaded-friendly, CPU only."""

import os
import sys
from pathlib import Path

# The Triton kernels run on CPU through the interpreter, which reads this when triton is first imported: setting it
# here, before any test module imports triton, lets one test file (`pytest tests/test_ramnet_kernels.py`) run its
# kernel tests instead of skipping them.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = ROOT.parent / "shared" / "datasets"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tiny tensors: one thread avoids spin-waiting between threads (60x faster on a busy 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_datasets() -> Path:
    """../shared/datasets beside the checkout (CI has it there)."""
    if not SHARED_DATASETS.is_dir():
        pytest.fail(f"expected the shared datasets at {SHARED_DATASETS}")
    return SHARED_DATASETS
