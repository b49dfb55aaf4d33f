"""Backtesting (forecast.backtest): cutoffs, no window sees data after its cutoff, metrics per cutoff."""

import numpy as np
import pandas as pd
import pytest

from forecast import MemoryForecaster
from forecast.backtest import backtest_metrics, cross_validation, cutoff_rows
from memorycore import InputError


def series(n=480, seed=0):
    index = pd.date_range("2024-01-01", periods=n, freq="h")
    rng = np.random.default_rng(seed)
    daily = np.sin(2 * np.pi * np.arange(n) / 24)
    return pd.DataFrame({"load": 10 + 3 * daily + 0.3 * rng.standard_normal(n),
                         "temp": 5 + daily + 0.3 * rng.standard_normal(n).cumsum() / 10}, index=index)


def small_model(**overrides):
    params = dict(lookback=24, horizon=12, d_model=8, heads=2, epochs=1, max_steps_per_epoch=3, verbose=False)
    return MemoryForecaster(**(params | overrides))


def test_cutoffs_end_h_rows_before_the_end_and_refuse_too_many_windows():
    assert cutoff_rows(100, h=10, n_windows=1, step_size=10) == [89]
    assert cutoff_rows(100, h=10, n_windows=3, step_size=5) == [79, 84, 89]
    with pytest.raises(InputError, match="fewer windows"):
        cutoff_rows(30, h=10, n_windows=5, step_size=10)
    with pytest.raises(InputError, match="n_windows must be a positive integer"):
        cutoff_rows(30, h=10, n_windows=0, step_size=10)


@pytest.mark.parametrize("refit", [False, True], ids=["fit-once", "refit"])
def test_no_window_sees_data_after_its_cutoff(refit):
    data = series()
    model = small_model()
    frame = model.cross_validation(data, n_windows=3, step_size=12, refit=refit)
    assert not hasattr(model, "network_")  # the estimator itself is left unfitted
    cutoffs = sorted(frame["cutoff"].unique())
    assert len(cutoffs) == 3 and len(frame) == 3 * 12 * 2
    assert (frame["ds"] > frame["cutoff"]).all()
    assert frame.groupby("cutoff")["ds"].min().tolist() == [c + pd.Timedelta("1h") for c in cutoffs]
    np.testing.assert_array_equal(frame.query("unique_id == 'load'")["y"],
                                  data["load"].iloc[-36:].to_numpy())  # the actuals, window after window

    changed = data.copy()
    changed.loc[changed.index > cutoffs[1]] += 2.0  # everything after the second cutoff
    again = model.cross_validation(changed, n_windows=3, step_size=12, refit=refit)
    before, after = (f.set_index(["unique_id", "cutoff", "ds"])["forecast"] for f in (frame, again))
    for cutoff in cutoffs[:2]:
        np.testing.assert_array_equal(before.xs(cutoff, level="cutoff"), after.xs(cutoff, level="cutoff"))
    assert not np.allclose(before.xs(cutoffs[2], level="cutoff"), after.xs(cutoffs[2], level="cutoff"))


def test_each_window_is_the_forecast_of_a_model_fitted_up_to_its_cutoff():
    data = series()
    frame = cross_validation(small_model(), data, n_windows=2, step_size=6, quantiles=[0.1, 0.9])
    first = pd.Timestamp(frame["cutoff"].min())
    fitted = small_model().fit(data.loc[:first])
    expected = fitted.predict(data.loc[:first], quantiles=[0.1, 0.9])
    window = frame[frame["cutoff"] == first].set_index(["unique_id", "ds"])
    np.testing.assert_allclose(window.loc["temp", "forecast"], expected["temp"])
    np.testing.assert_allclose(window.loc["temp", "forecast_q0.9"], expected["temp_q0.9"])


def test_backtest_metrics_per_cutoff_and_series_match_a_hand_computation():
    frame = pd.DataFrame({"unique_id": ["a"] * 4, "cutoff": pd.to_datetime(["2024-01-03"] * 2 + ["2024-01-04"] * 2),
                          "ds": pd.to_datetime(["2024-01-04", "2024-01-05", "2024-01-05", "2024-01-06"]),
                          "y": [2.0, 4.0, 4.0, 6.0], "forecast": [3.0, 4.0, 4.0, 3.0]})
    history = pd.DataFrame({"a": [0.0, 1.0, 2.0, 4.0, 6.0]}, index=pd.date_range("2024-01-01", periods=5, freq="D"))
    table = backtest_metrics(frame, history, season=1)
    first, second = table.iloc[0], table.iloc[1]
    assert first["MAE"] == 0.5 and first["MSE"] == 0.5  # errors 1, 0
    assert second["MAE"] == 1.5 and second["RMSE"] == pytest.approx(np.sqrt(4.5))  # errors 0, 3
    assert first["MASE"] == pytest.approx(0.5 / 1.0)  # naive errors on 0, 1, 2: 1, 1
    assert second["MASE"] == pytest.approx(1.5 / (4 / 3))  # on 0, 1, 2, 4: 1, 1, 2


# ------------------------------------------------------------------------------------------------------- the CLI
def test_backtest_command_prints_tables_writes_the_frame_and_the_plot(tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from tests.test_forecast_cli import assert_one_line_error, write_series

    data = write_series(tmp_path / "series.csv", n=400)
    runner = CliRunner()
    tiny = ["--data", str(data), "--lookback", "24", "--horizon", "8", "--epochs", "1", "--max-steps", "3", "-q"]
    result = runner.invoke(app, ["forecast", "backtest", *tiny, "--n-windows", "3", "--step-size", "4",
                                 "--out", str(tmp_path / "cv.csv"), "--plot", str(tmp_path / "cv.png")])
    assert result.exit_code == 0, result.stderr
    assert "3 cutoffs, horizon 8" in result.stdout and "MASE" in result.stdout and "CRPS" in result.stdout
    frame = pd.read_csv(tmp_path / "cv.csv")
    assert len(frame) == 3 * 8 * 2 and {"unique_id", "ds", "cutoff", "y", "forecast", "forecast_q0.9"} <= set(frame)
    assert (tmp_path / "cv.png").stat().st_size > 0
    too_many = runner.invoke(app, ["forecast", "backtest", *tiny, "--n-windows", "500"])
    assert_one_line_error(too_many, "ask for fewer windows or a smaller step")
    help_text = runner.invoke(app, ["forecast", "backtest", "--help"])
    assert help_text.exit_code == 0 and "Examples" in help_text.stdout
