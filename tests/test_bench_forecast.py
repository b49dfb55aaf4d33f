"""bench/forecast.py end to end on the bundled ETTh1 (one horizon, a few steps): rows, summary and JSON."""

import json
import subprocess
import sys
from pathlib import Path

from forecast import MemoryForecaster

ROOT = Path(__file__).resolve().parents[1]


def test_forecast_bench_runs_and_records_the_shared_settings(tmp_path):
    out = tmp_path / "forecast.json"
    command = [sys.executable, str(ROOT / "bench" / "forecast.py"), "--quick", "--data-dir", str(tmp_path / "none"),
               "--horizons", "96", "--epochs", "1", "--max-steps-per-epoch", "2", "--d-model", "16", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "ETTh1" in result.stdout and "beats ridge" in result.stdout
    payload = json.loads(out.read_text())
    assert payload["config"]["d_model"] == 16 and payload["config"]["epochs"] == 1  # the flags' overrides
    assert payload["config"]["lr"] == MemoryForecaster().lr  # and MemoryForecaster's defaults for the rest
    assert "horizon" not in payload["config"]
    (row,) = payload["results"]
    assert row["dataset"] == "ETTh1" and row["horizon"] == 96 and row["test_windows"] == 2785
    assert 0 < row["mse"] < 1 and 0 < row["ridge_mse"] < 1


def test_bad_settings_stop_before_any_work_and_keep_earlier_results(tmp_path):
    out = tmp_path / "forecast.json"
    out.write_text('{"results": ["earlier"]}')
    script = [sys.executable, str(ROOT / "bench" / "forecast.py"), "--quick", "--out", str(out)]
    for extra, message in ((["--epochs", "0"], "error: epochs must be a positive integer, got 0"),
                           (["--lr", "nan"], "error: lr must be a finite number > 0, got nan"),
                           (["--horizons", "0"], "argument --horizons: must be > 0, got 0"),
                           (["--threads", "0"], "argument --threads: must be > 0, got 0"),
                           (["--out", str(tmp_path)], "it is a folder")):
        result = subprocess.run([*script, *extra], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr
        assert "Traceback" not in result.stderr
    assert out.read_text() == '{"results": ["earlier"]}'
