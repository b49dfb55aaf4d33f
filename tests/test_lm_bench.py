"""bench/lm.py end to end on a small text (two variants, a few steps): table and JSON; bad settings stop at once."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


def run(*args):
    return subprocess.run([sys.executable, str(ROOT / "bench" / "lm.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_lm_bench_trains_both_at_equal_size_and_measures_generation(tmp_path):
    (tmp_path / "input.txt").write_text(TEXT)
    out = tmp_path / "lm.json"
    result = run("--data", str(tmp_path / "input.txt"), "--variants", "attention,lmm", "--dim", "16", "--depth", "1",
                 "--block-size", "16", "--batch-size", "4", "--steps", "2", "--eval-interval", "2", "--generate",
                 "4,16", "--device", "cpu", "--out", str(out))
    assert result.returncode == 0, result.stderr
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"attention", "lmm"}
    sizes = [r["parameters"] for r in results.values()]
    assert abs(sizes[0] - sizes[1]) < 0.25 * sizes[0]  # the memory variant's width matched to the baseline's size
    attention = results["attention"]["generation"]
    assert attention["16"]["memory_mib"] > attention["4"]["memory_mib"]  # full attention's cache grows
    assert "| lmm |" in result.stdout


def test_bad_settings_stop_at_parse_time(tmp_path):
    for args, message in [(["--variants", "rnn"], "unknown variant"), (["--generate", "1k"], "--generate"),
                          (["--data", str(tmp_path / "missing.txt")], "not a file")]:
        result = run(*args, "--out", str(tmp_path / "lm.json"))
        assert result.returncode == 2 and message in result.stderr
