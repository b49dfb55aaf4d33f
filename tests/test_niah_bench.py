"""bench/niah.py end to end with a few steps: equal sizes, a row per context length, state sizes; bad settings stop
at parse time."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "niah.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_niah_bench_scores_every_length_at_equal_size(tmp_path):
    out, plot = tmp_path / "niah.json", tmp_path / "niah.png"
    result = run("--variants", "swa,attention,mag", "--dim", "16", "--depth", "1", "--heads", "2", "--steps", "2",
                 "--train-length", "32", "--multiples", "1,2", "--test-examples", "4", "--window", "8",
                 "--device", "cpu", "--out", str(out), "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    rows = {row["variant"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"swa", "attention", "mag"} and plot.is_file()
    sizes = [row["parameters"] for row in rows.values()]
    assert max(sizes) - min(sizes) < 0.25 * max(sizes)  # widths matched to the largest variant
    for row in rows.values():
        assert [r["length"] for r in row["results"]] == [32, 64]
        assert all(0 <= r["accuracy"] <= 1 for r in row["results"])
    swa, attention = rows["swa"]["results"], rows["attention"]["results"]
    assert swa[0]["state_floats"] == swa[1]["state_floats"]  # a window's cache does not grow
    assert attention[1]["state_floats"] > attention[0]["state_floats"]  # full attention's does


def test_bad_settings_stop_at_parse_time(tmp_path):
    for args, message in [(["--variants", "gru"], "unknown variant(s) gru"), (["--multiples", "1,0"], "--multiples"),
                          (["--steps", "0"], "--steps"), (["--memory-forgetting", "1"], "between 0 and 1")]:
        result = run(*args, "--out", str(tmp_path / "x.json"))
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert not (tmp_path / "x.json").exists()
