"""Many series in the long format that start and end on different dates (forecast.ragged): read without inventing
values, too-short series skipped with a warning, training on each series' own windows, a forecast for every series
after its own last timestamp."""

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from forecast import MemoryForecaster, read_series, wide_to_long
from forecast.ragged import masked_loss
from memorycore import InputError


def series(name, start, periods, level, seed):
    index = pd.date_range(start, periods=periods, freq="h")
    rng = np.random.default_rng(seed)
    values = level + np.sin(2 * np.pi * np.arange(periods) / 24) + 0.1 * rng.standard_normal(periods)
    return pd.DataFrame({"unique_id": name, "ds": index, "y": values})


@pytest.fixture(scope="module")
def ragged():
    return pd.concat([series("a", "2024-01-01", 600, 5.0, 0), series("b", "2024-01-05", 500, -3.0, 1),
                      series("c", "2024-01-03 07:00", 300, 10.0, 2), series("tiny", "2024-01-10", 30, 1.0, 3)],
                     ignore_index=True)


@pytest.fixture(scope="module")
def fitted(ragged):
    model = MemoryForecaster(lookback=24, horizon=12, d_model=8, heads=2, epochs=1, max_steps_per_epoch=4,
                             verbose=False)
    with pytest.warns(UserWarning, match=r"1 of 4 series have fewer than lookback \+ horizon = 36 values and were "
                                         r"skipped: tiny"):
        return model.fit(ragged)


def test_ragged_long_data_round_trips_without_invented_values(ragged):
    wide = read_series(ragged)
    assert wide.isna().sum().to_dict() == {"a": len(wide) - 600, "b": len(wide) - 500, "c": len(wide) - 300,
                                           "tiny": len(wide) - 30}
    back = wide_to_long(wide).dropna().reset_index(drop=True)
    expected = ragged.sort_values(["unique_id", "ds"], kind="stable").reset_index(drop=True)
    pd.testing.assert_frame_equal(back, expected, check_names=False, check_dtype=False)
    gap = ragged.drop(index=[200, 201])  # a hole inside series "a" is missing data, not a ragged edge
    with pytest.raises(InputError, match=r"NaN/inf values in a \(2 value\(s\)"):
        read_series(gap)
    filled = read_series(gap, fill="interpolate")
    assert filled["a"].notna().sum() == 600 and filled["b"].notna().sum() == 500  # only the hole is filled


def test_every_series_is_forecast_after_its_own_last_timestamp(fitted, ragged):
    assert fitted.columns_ == ["a", "b", "c"]
    forecast = fitted.predict(quantiles=[0.1, 0.9])
    assert list(forecast.columns) == ["unique_id", "ds", "y", "y_q0.1", "y_q0.9"] and forecast.notna().all(axis=None)
    for name, rows in forecast.groupby("unique_id"):
        last = ragged.loc[ragged["unique_id"] == name, "ds"].max()
        assert rows["ds"].tolist() == list(pd.date_range(last, periods=13, freq="h")[1:])
    again = fitted.predict(ragged)
    pd.testing.assert_frame_equal(again, forecast.drop(columns=["y_q0.1", "y_q0.9"]))


def test_each_series_is_forecast_from_its_own_rows_alone(fitted, ragged):
    c = ragged[ragged["unique_id"] == "c"].tail(24)
    window = (c["y"].to_numpy() - fitted.scaler_.mean[2]) / fitted.scaler_.scale[2]
    alone = fitted.forecast_series_scaled(window[None], np.array([2]), phases=fitted.phases_at(c["ds"].iloc[:1]))
    expected = alone[0] * fitted.scaler_.scale[2] + fitted.scaler_.mean[2]
    got = fitted.predict().query("unique_id == 'c'")["y"].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_ragged_series_are_scored_on_their_own_windows(fitted, ragged):
    scores = fitted.evaluate(ragged, units=True)
    assert np.isfinite(scores["mse"]) and 0 < scores["mse"] < 10
    assert 0 <= scores["interval_coverage"] <= 1
    assert set(scores["channels"].index) <= {"a", "b", "c"} and scores["channels"].notna().all(axis=None)
    assert np.isfinite(fitted.residual_quantiles_).all()


def test_the_loss_counts_a_window_only_for_the_series_that_fill_it():
    torch.manual_seed(0)
    net = MemoryForecaster(lookback=8, horizon=4, d_model=8, heads=2).get_params()
    from forecast.model import ForecastNetConfig, MemoryForecastNet
    model = MemoryForecastNet(ForecastNetConfig.from_params(net, n_channels=2, cycle_length=0))
    windows, targets = torch.randn(3, 8, 2), torch.randn(3, 4, 2)
    windows[0, :3, 1] = float("nan")  # series 1 does not exist yet in the first window
    loss = masked_loss(torch.nn.functional.mse_loss, model, windows, targets, [])
    prediction = model(torch.nan_to_num(windows))
    valid = [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1)]
    expected = torch.stack([(prediction[b, :, c] - targets[b, :, c]).square().mean() for b, c in valid]).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_mixing_models_refuse_ragged_series(ragged):
    with warnings.catch_warnings(), pytest.raises(InputError, match="channels='independent'"):
        warnings.simplefilter("ignore")
        MemoryForecaster(lookback=24, horizon=12, channels="mixing", verbose=False).fit(ragged)


def test_backtests_of_ragged_series_score_the_series_present_after_each_cutoff(ragged):
    model = MemoryForecaster(lookback=24, horizon=12, d_model=8, heads=2, epochs=1, max_steps_per_epoch=2,
                             verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "tiny" is skipped
        frame = model.cross_validation(ragged, n_windows=2, step_size=6)
    assert set(frame["unique_id"]) == {"a", "b"}  # "c" ended long before the cutoffs
    assert (frame["ds"] > frame["cutoff"]).all() and frame[["y", "forecast"]].notna().all(axis=None)
    truth = ragged.set_index(["unique_id", "ds"])["y"]
    np.testing.assert_array_equal(frame["y"], truth.loc[list(zip(frame["unique_id"], frame["ds"]))].to_numpy())


def test_the_ridge_baseline_scores_ragged_series_on_their_own_windows(fitted, ragged):
    from forecast.baseline import ridge_benchmark

    mse, mae, _ = ridge_benchmark(fitted.prepare(ragged), fitted.lookback, fitted.horizon)
    assert np.isfinite(mse) and np.isfinite(mae) and 0 < mse < 1


def test_a_ragged_model_is_predicted_and_plotted_from_the_command_line(fitted, tmp_path):
    from typer.testing import CliRunner

    from cli import app
    from forecast.ragged import long_forecast_to_wide

    wide = long_forecast_to_wide(fitted.predict(quantiles=[0.1, 0.9]))
    assert list(wide.columns) == ["a", "b", "c", "a_q0.1", "b_q0.1", "c_q0.1", "a_q0.9", "b_q0.9", "c_q0.9"]
    assert wide["c"].notna().sum() == 12 and wide["c"].last_valid_index() < wide["a"].first_valid_index()
    path = fitted.save(tmp_path / "ragged.safetensors")
    runner = CliRunner()
    plotted = runner.invoke(app, ["forecast", "plot", "--model", str(path), "--out", str(tmp_path / "r.png")])
    assert plotted.exit_code == 0, plotted.stderr
    predicted = runner.invoke(app, ["forecast", "predict", "--model", str(path)])
    assert predicted.exit_code == 0 and predicted.stdout.startswith("unique_id,ds,y")
