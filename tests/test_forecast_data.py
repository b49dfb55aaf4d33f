"""The data layer: reading, validation errors, the Time-Series-Library protocol, scaling and windows."""

import numpy as np
import pandas as pd
import pytest

from forecast.baseline import ALPHAS, RidgeBaseline, evaluate_windows, ridge_benchmark
from forecast.data import (StandardScaler, dataset_name, is_long_format, long_to_wide, prepare_protocol, read_series,
                           resolve_protocol, split_borders, wide_to_long)
from memorycore import InputError

ETTH1 = "datasets/ETTh1/ETTh1.csv.gz"


def hourly(n=300, columns=("a", "b")):
    index = pd.date_range("2024-01-01", periods=n, freq="h")
    rng = np.random.default_rng(0)
    return pd.DataFrame({c: rng.standard_normal(n).cumsum() for c in columns}, index=index)


def as_csv_frame(wide):
    return wide.rename_axis("date").reset_index()


@pytest.fixture(scope="module")
def etth1():
    from tests.conftest import ROOT
    return read_series(ROOT / ETTH1)


def test_etth1_protocol_borders_are_12_4_4_months(etth1):
    assert etth1.shape == (17420, 7)
    split = split_borders(len(etth1), 96, resolve_protocol("auto", dataset_name(ETTH1)))
    assert split.train == (0, 8640)
    assert (split.val[1] - split.val[0] - 96, split.test[1] - split.test[0] - 96) == (2880, 2880)
    assert split.val == (8640 - 96, 11520) and split.test == (11520 - 96, 14400)


def test_ettm_borders_are_four_times_etth():
    split = split_borders(69680, 96, "ettm")
    assert split.train == (0, 34560) and split.val == (34560 - 96, 46080) and split.test == (46080 - 96, 57600)


def test_other_datasets_use_70_10_20():
    assert resolve_protocol("auto", dataset_name("data/weather.csv.gz")) == "ratio"
    assert resolve_protocol("auto", dataset_name("my_sales.csv")) == "ratio"
    assert dataset_name("ETTm2.csv") == "ettm2" and dataset_name("electricity_col0_OT.csv.gz") == "electricity"
    split = split_borders(1000, 24, "ratio")
    assert split.train == (0, 700) and split.val == (700 - 24, 800) and split.test == (800 - 24, 1000)


def test_scaler_is_fit_on_the_training_rows_only(etth1):
    data = prepare_protocol(etth1, 96, 96, "etth")
    train_rows = etth1.to_numpy()[:8640]
    np.testing.assert_allclose(data.scaler.mean, train_rows.mean(axis=0))
    np.testing.assert_allclose(data.scaler.scale, train_rows.std(axis=0))
    np.testing.assert_allclose(data.train.mean(axis=0), 0, atol=1e-9)
    assert np.abs(data.test.mean(axis=0)).max() > 0.05  # the test split is not re-centred


def test_every_test_window_is_kept(etth1):
    data = prepare_protocol(etth1, 96, 96, "etth")
    test = data.windows("test", 96, 96)
    assert len(test) == 2880 - 96 + 1 == 2785
    x, y = test[len(test) - 1]
    assert x.shape == (96, 7) and y.shape == (96, 7)
    np.testing.assert_allclose(y[-1].numpy(), data.test[-1], rtol=1e-6)  # the last window ends at row 14400
    np.testing.assert_allclose(test[0][1][0].numpy(), data.scaler.transform(etth1.to_numpy()[11520]), rtol=1e-5)


def test_long_and_wide_round_trip():
    wide = hourly(10)
    long = wide_to_long(wide.rename_axis("ds"))
    assert list(long.columns) == ["unique_id", "ds", "y"] and len(long) == 20
    back = long_to_wide(long)
    pd.testing.assert_frame_equal(back, wide.rename_axis("ds"), check_freq=False)
    pd.testing.assert_frame_equal(read_series(long), back)
    named_like_columns = hourly(10, columns=("ds", "y"))  # series may carry the long format's own column names
    again = long_to_wide(wide_to_long(named_like_columns.rename_axis("ds")))
    pd.testing.assert_frame_equal(again, named_like_columns.rename_axis("ds"), check_freq=False)


def test_reads_csv_gz(tmp_path):
    path = tmp_path / "x.csv.gz"
    as_csv_frame(hourly(50)).to_csv(path, index=False)
    wide = read_series(path, target=["b"])
    assert list(wide.columns) == ["b"] and isinstance(wide.index, pd.DatetimeIndex) and len(wide) == 50


@pytest.mark.parametrize("frame, message", [
    (pd.DataFrame({"x": [1.0, 2.0, 3.0], "y": [4.0, 5.0, 6.0]}), "no date column"),
    (pd.DataFrame({"date": pd.date_range("2024", periods=3, freq="h"), "a": [1.0, 2, 3], "kind": ["u", "v", "w"]}),
     "non-numeric column(s): kind"),
    (pd.DataFrame({"date": pd.date_range("2024", periods=4, freq="h"), "a": [1.0, np.nan, 3, np.inf]}),
     "NaN/inf values in a (2 value(s), the first at 2024-01-01 01:00:00)"),
    (pd.DataFrame({"date": ["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 01:00", "2024-01-01 03:00"],
                   "a": [1.0, 2, 3, 4]}), "duplicate timestamp 2024-01-01 01:00:00 (row 2)"),
    (pd.DataFrame({"date": ["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 02:00", "2024-01-01 05:00"],
                   "a": [1.0, 2, 3, 4]}), "irregular timestamps"),
    (pd.DataFrame({"date": ["2024-01-01 00:00", "unknown", "2024-01-01 02:00"], "a": [1.0, 2, 3]}),
     "column 'date' does not hold dates (row 1 holds 'unknown')"),
    (pd.DataFrame({"date": [1704067200, 1704070800, 1704074400], "a": [1.0, 2, 3]}),
     "does not hold dates (numbers, e.g. 1704067200; write the dates as text"),
    (pd.DataFrame({"date": pd.date_range("2024", periods=3, freq="h"), "a": ["1", "1,234", "2"]}),
     "non-numeric column(s): a (a holds '1,234' at 2024-01-01 01:00:00)"),
    (pd.DataFrame({"date": ["2024-03-31 01:00+01:00", "2024-03-31 02:00", "2024-03-31 03:00+02:00"],
                   "a": [1.0, 2, 3]}), "some timestamps carry a UTC offset and some do not"),
])
def test_bad_input_is_named(frame, message):
    accepted_as_steps = message.startswith(("duplicate timestamp", "irregular timestamps"))  # --allow-irregular
    for allow_irregular in (False,) if accepted_as_steps else (False, True):
        with pytest.raises(InputError) as error:
            read_series(frame, allow_irregular=allow_irregular)
        assert message in str(error.value)


@pytest.mark.parametrize("dates, message", [
    (pd.date_range("2024", periods=5, freq="h").astype(str)[::-1], "timestamps go back in time at row 1"),
    ([*pd.date_range("2024", periods=4, freq="h").astype(str), ""], "row 4 has no timestamp"),
])
def test_time_must_run_forward_even_with_allow_irregular(dates, message):
    for allow_irregular in (False, True):
        with pytest.raises(InputError, match=message):
            read_series(pd.DataFrame({"date": dates, "a": np.arange(5.0)}), allow_irregular=allow_irregular)


def test_local_clock_times_repeating_an_hour_pass_with_allow_irregular_only():
    local = pd.date_range("2024-10-27", periods=16, freq="15min", tz="Europe/Paris").tz_localize(None)  # 02:xx twice
    frame = pd.DataFrame({"date": local.astype(str), "a": np.arange(16.0)})
    with pytest.raises(InputError, match="go back in time at row 12 .* pass --allow-irregular"):
        read_series(frame)
    assert len(read_series(frame, allow_irregular=True)) == 16
    with pytest.raises(InputError, match="no date column found"):  # text is not taken for dates with offsets
        read_series(pd.DataFrame({"state": ["AZ", "CA", "NY"], "a": [1.0, 2, 3]}))


def test_dates_across_a_daylight_saving_change_are_read_in_utc():
    local = pd.date_range("2024-03-30", periods=72, freq="h", tz="Europe/Paris")  # 31 March: +01:00 -> +02:00
    wide = read_series(pd.DataFrame({"date": local.astype(str), "a": np.arange(72.0)}))
    assert wide.index[0] == pd.Timestamp("2024-03-29 23:00") and (np.diff(wide.index.asi8) == 3600e9).all()


def test_other_separators_and_written_row_numbers(tmp_path):
    frame = as_csv_frame(hourly(20))
    frame.to_csv(tmp_path / "semicolon.csv", sep=";", index=False)
    assert list(read_series(tmp_path / "semicolon.csv").columns) == ["a", "b"]
    frame.to_csv(tmp_path / "with_index.csv")  # pandas writes the row numbers as a first column 'Unnamed: 0'
    with pytest.warns(UserWarning, match="ignored the first column 'Unnamed: 0'") as caught:
        assert list(read_series(tmp_path / "with_index.csv").columns) == ["a", "b"]
        assert not is_long_format(tmp_path / "with_index.csv")  # reads the header only: no second warning
    assert len(caught) == 1
    assert list(read_series(frame, target=["b", "b"]).columns) == ["b"]


def test_nan_message_stays_one_short_line_for_many_channels():
    wide = hourly(10, columns=[f"c{i}" for i in range(40)])
    wide.iloc[3] = np.nan
    with pytest.raises(InputError) as error:
        read_series(as_csv_frame(wide))
    assert "c4 (1 value(s)" in str(error.value) and "c5 (" not in str(error.value)
    assert "and 35 more columns; clean the data or pass --fill interpolate" in str(error.value)


def test_future_index_stays_within_pandas_dates():
    from forecast.data import future_index

    days = pd.date_range("2024-01-01", periods=10, freq="D")
    assert future_index(days, 3)[-1] == pd.Timestamp("2024-01-13")
    with pytest.raises(InputError, match="run past 2262-04-11"):
        future_index(days, 100_000)


def test_unknown_target_and_missing_file(tmp_path):
    with pytest.raises(InputError, match="unknown target column.*'OT'"):
        read_series(as_csv_frame(hourly(5)), target="OT")
    with pytest.raises(InputError, match="data file not found"):
        read_series(tmp_path / "nope.csv")


def test_fill_interpolate_and_allow_irregular():
    frame = pd.DataFrame({"date": pd.date_range("2024", periods=4, freq="h"), "a": [1.0, np.nan, 3, np.inf]})
    np.testing.assert_allclose(read_series(frame, fill="interpolate")["a"], [1, 2, 3, 3])
    frame = pd.DataFrame({"date": ["2024-01-01 00:00", "2024-01-01 01:00", "2024-01-01 01:00"], "a": [1.0, 2, 3]})
    assert len(read_series(frame.iloc[[0, 1, 2, 2]], allow_irregular=True)) == 4


def test_too_short_series_for_lookback_plus_horizon():
    with pytest.raises(InputError, match="too short.*lookback \\+ horizon = 120"):
        prepare_protocol(hourly(200), 96, 24, "ratio")
    with pytest.raises(InputError, match="ETTH protocol needs 14400 rows"):
        prepare_protocol(hourly(2000), 96, 24, "etth")


def test_standard_scaler_round_trip():
    values = np.random.default_rng(1).normal(3, 2, size=(100, 3))
    scaler = StandardScaler.fit(values)
    restored = StandardScaler.from_dict(scaler.to_dict())
    np.testing.assert_allclose(restored.inverse_transform(restored.transform(values)), values)
    scaled = restored.transform(values)
    np.testing.assert_allclose(scaled.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(scaled.std(axis=0), 1.0, rtol=1e-12)


def test_ridge_baseline_learns_and_uses_validation_alpha():
    t = np.arange(3000)
    noise = 0.05 * np.random.default_rng(0).standard_normal((3000, 2))
    series = np.stack([np.sin(t / 7.0), np.cos(t / 11.0)], axis=1) + noise
    wide = pd.DataFrame(series, index=pd.date_range("2024", periods=3000, freq="h"))
    data = prepare_protocol(wide, 48, 12, "ratio")
    mse, mae, alpha = ridge_benchmark(data, 48, 12)
    naive_mse, _ = evaluate_windows(lambda w: np.repeat(w[:, -1:], 12, axis=1), data.test, 48, 12)
    assert mse < 0.1 * naive_mse
    models = RidgeBaseline.fit_path(data.train, 48, 12, ALPHAS)
    val_mse = [evaluate_windows(m.predict, data.val, 48, 12)[0] for m in models]
    best = int(np.argmin(val_mse))
    assert best > 0 and alpha == ALPHAS[best]  # this data's best is not the first alpha tried
    model = RidgeBaseline.fit(data.train, 48, 12)
    assert model.predict(data.test[None, :48]).shape == (1, 12, 2)
