"""bench/neural_memory_footprint.py measures, on CPU, the memory the Triton path allocates and keeps."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "neural_memory_footprint.py"


def test_our_footprint_covers_the_kept_chunk_boundary_states(tmp_path):
    out = tmp_path / "footprint.json"
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(BENCH), "--implementations", "ours", "--time", "2048", "--out",
                           str(out)], capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(out.read_text())["rows"]
    # the forward keeps W1, W2, S1, S2 (64 x 256 floats each) for 8 heads at each of the 2048 / 64 + 1 boundaries
    boundary_states_gib = 4 * 64 * 256 * 4 * 8 * (2048 // 64 + 1) / 2**30
    assert row["implementation"] == "ours" and row["time"] == 2048
    assert row["peak_rise_gib"] >= boundary_states_gib, (row, boundary_states_gib)
