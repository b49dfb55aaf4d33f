"""bench/ramnet_throughput.py: a small CPU run writes its JSON and the tokens/s-against-slots plot."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
ramnet_throughput = pytest.importorskip("ramnet_throughput")


def test_quick_run_writes_results_and_plot(tmp_path):
    out, plot = tmp_path / "throughput.json", tmp_path / "throughput.png"
    ramnet_throughput.main(["--quick", "--max-factors", "6", "--repeats", "1", "--time", "32", "--out", str(out),
                            "--plot", str(plot)])
    rows = json.loads(out.read_text())["rows"]
    assert [row["slots"] for row in rows] == [4**5, 4**6] and all(row["tokens_per_s"] > 0 for row in rows)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_grow_factor_size_keeps_five_factors(tmp_path):
    out = tmp_path / "throughput.json"
    ramnet_throughput.main(["--quick", "--grow", "factor-size", "--max-factors", "6", "--repeats", "1", "--time", "32",
                            "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(row["factors"], row["factor_size"], row["slots"]) for row in rows] == [(5, 4, 4**5), (5, 5, 5**5)]
