"""Dirty data (forecast.outliers and the forecaster's use of it): sentinels and values beyond a robust bound are
reported and filled by default, the bound ignores them, non-negative channels stay non-negative."""

import warnings

import numpy as np
import pandas as pd
import pytest

from forecast import MemoryForecaster, read_series
from forecast.outliers import MAD_LIMIT, OutlierBounds, find_outliers, handle_outliers
from memorycore import InputError


def frame(values, start="2020-02-20 07:20", freq="10min", column="wv"):
    return pd.DataFrame({column: np.asarray(values, dtype=float)},
                        index=pd.date_range(start, periods=len(values), freq=freq))


def test_the_bound_is_many_mads_from_the_median_and_ignores_sentinels():
    bounds = OutlierBounds.fit(np.array([[1.0], [2.0], [3.0], [4.0], [-9999.0]]))  # median 2.5, MAD 1
    half = MAD_LIMIT * 1.4826 * 1.0
    np.testing.assert_allclose([bounds.low[0], bounds.high[0]], [2.5 - half, 2.5 + half])
    data = frame([2.0, 2.5 + half + 0.1, -9999.0, np.nan])
    assert find_outliers(data, bounds)[:, 0].tolist() == [False, True, True, False]  # NaN is missing, not an outlier


def test_a_channel_mostly_at_one_value_is_checked_for_sentinels_only():
    rain = np.zeros(100)
    rain[[10, 50]] = [11.0, -9999.0]  # a storm is a value, -9999 is not
    bounds = OutlierBounds.fit(rain[:, None])
    assert np.isinf(bounds.high[0])
    assert np.flatnonzero(find_outliers(frame(rain), bounds)).tolist() == [50]


def test_outliers_are_reported_with_column_count_and_first_timestamp():
    data = frame([1.0, 2.0, -9999.0, 4.0, -9999.0, 6.0])
    bounds = OutlierBounds.fit(data.to_numpy())
    with pytest.warns(UserWarning, match=r"wv: 2 value\(s\) from 2020-02-20 07:40:00 \(-9999\); treated as missing"):
        filled = handle_outliers(data, bounds, "missing")
    assert filled["wv"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]  # interpolated, the rest untouched
    with pytest.warns(UserWarning, match="kept"):
        assert handle_outliers(data, bounds, "keep").equals(data)
    with pytest.raises(InputError, match=r"wv: 2 value\(s\) from 2020-02-20 07:40:00.*--outliers missing"):
        handle_outliers(data, bounds, "error")
    with pytest.raises(InputError, match="unknown outlier action"):
        handle_outliers(data, bounds, "drop")


def test_clean_data_passes_untouched_and_silently():
    data = frame(np.sin(np.arange(200) / 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert handle_outliers(data, OutlierBounds.fit(data.to_numpy())) is data


# --------------------------------------------------------------------------------------------------- Weather
WIND, RADIATION, RAIN = "wv (m/s)", 17, "rain (mm)"  # SWDR's unit is not valid UTF-8 in the file: by position


@pytest.fixture(scope="module")
def weather(request):
    from tests.conftest import SHARED_DATASETS
    raw = pd.read_csv(SHARED_DATASETS / "weather" / "weather.csv.gz", encoding="latin-1")
    dates = pd.to_datetime(raw["date"])
    rows = raw[(dates >= "2020-01-15") & (dates < "2020-04-01")]  # the sentinel (Feb 20) in the training rows
    return rows[["date", WIND, raw.columns[RADIATION], RAIN]].rename(columns={raw.columns[RADIATION]: "SWDR"})


def small_model():
    return MemoryForecaster(lookback=144, horizon=36, d_model=8, heads=2, epochs=1, max_steps_per_epoch=2,
                            verbose=False)


def test_weather_sentinel_is_reported_and_does_not_reach_the_learned_cycle(weather):
    assert (weather[WIND] == -9999).sum() == 1
    with pytest.warns(UserWarning, match=r"wv \(m/s\): 1 value\(s\) from 2020-02-20 07:40:00 \(-9999\)"):
        model = small_model().fit(weather, allow_irregular=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = small_model().fit(weather, allow_irregular=True, outliers="keep")
    phase = int(model.phases_at(pd.DatetimeIndex(["2020-02-20 07:40"]))[0])
    wind = model.columns_.index(WIND)

    def cycle_in_units(fitted):  # the learned daily cycle of wind speed, m/s around its mean
        return fitted.network_.cycle.detach().numpy()[:, wind] * fitted.scaler_.scale[wind]

    clean, dirty = cycle_in_units(model), cycle_in_units(kept)
    assert dirty[phase] < -100  # what -9999 did: a dip at 07:40 every day
    assert abs(clean[phase]) < 1 and abs(clean[phase] - np.median(clean[phase - 3:phase + 4])) < 0.5
    assert model.scaler_.scale[wind] < 3 < kept.scaler_.scale[wind]


def test_non_negative_channels_stay_non_negative(weather):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = small_model().fit(weather, allow_irregular=True)
        loose = small_model().fit(weather, allow_irregular=True, allow_negative=True)
    night = weather[pd.to_datetime(weather["date"]) < "2020-03-20 21:00"]  # forecast through a night's zero sun
    forecast = model.predict(night, quantiles=[0.05, 0.95])
    assert (forecast.to_numpy() >= 0).all()
    unclipped = loose.predict(night, quantiles=[0.05, 0.95])
    assert (unclipped.to_numpy() < 0).any()  # without the clip the lower bounds go below 0
    np.testing.assert_array_equal(forecast.to_numpy(), np.maximum(unclipped.to_numpy(), 0))
    scores = model.evaluate(weather, units=True)
    assert set(scores["channels"].index) == set(model.columns_) and (scores["channels"]["MAE"] > 0).all()


# ------------------------------------------------------------------------------------------------ day-first dates
def test_day_first_dates_are_named_in_the_error():
    index = pd.date_range("2024-01-01", periods=400, freq="h")
    for layout in ("%d/%m/%Y %H:%M", "%d.%m.%Y %H:%M", "%d-%m-%Y"):
        raw = pd.DataFrame({"date": index.strftime(layout), "load": np.arange(400.0)})
        with pytest.raises(InputError, match=r"day-first dates \(e\.g\. '13.01.2024.*dayfirst=True"):
            read_series(raw)
    month_first = pd.DataFrame({"date": index.strftime("%m/%d/%Y %H:%M"), "load": np.arange(400.0)})
    assert read_series(month_first).index.equals(index.rename("date"))  # still read as before
