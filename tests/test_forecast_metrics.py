"""Forecast metrics in the data's units (forecast.metrics), each against a value computed by hand."""

import numpy as np
import pytest

from forecast.metrics import channel_metrics, point_metrics, quantile_metrics, seasonal_error
from memorycore import InputError


def test_point_metrics_against_hand_computed_values():
    scores = point_metrics(np.array([1.0, 2.0, 4.0]), np.array([2.0, 2.0, 2.0]), insample=np.array([0.0, 1.0, 3.0]))
    assert scores["MAE"] == pytest.approx(1.0)  # |-1|, 0, 2
    assert scores["MSE"] == pytest.approx(5 / 3)  # 1, 0, 4
    assert scores["RMSE"] == pytest.approx(np.sqrt(5 / 3))
    assert scores["MAPE"] == pytest.approx((1 / 1 + 0 + 2 / 4) / 3)
    assert scores["sMAPE"] == pytest.approx(2 * (1 / 3 + 0 + 2 / 6) / 3)
    assert scores["MASE"] == pytest.approx(1.0 / 1.5)  # naive errors on the past: |1 - 0|, |3 - 1|


def test_undefined_metrics_are_nan_not_huge():
    scores = point_metrics(np.array([0.0, 2.0]), np.array([0.0, 1.0]))
    assert np.isnan(scores["MAPE"])  # a zero truth: MAPE is undefined (scikit-learn's would be ~1e15)
    assert scores["sMAPE"] == pytest.approx((0 + 2 * 1 / 3) / 2)  # y = f = 0 is no error
    assert np.isnan(scores["MASE"])  # no past given
    flat = point_metrics(np.array([1.0]), np.array([2.0]), insample=np.array([3.0, 3.0, 3.0]))
    assert np.isnan(flat["MASE"])  # a constant past: the naive forecast makes no error


def test_seasonal_naive_error_uses_the_season():
    past = np.array([1.0, 2.0, 3.0, 2.0, 3.0, 5.0])
    assert seasonal_error(past, season=3) == pytest.approx((1 + 1 + 2) / 3)
    assert seasonal_error(past, season=1) == pytest.approx((1 + 1 + 1 + 1 + 2) / 5)
    assert seasonal_error(past, season=10) == seasonal_error(past, season=1)  # longer than the past: 1


def test_crps_and_weighted_quantile_loss_against_hand_computed_values():
    truth = np.array([10.0])
    scores = quantile_metrics(truth, {0.1: np.array([8.0]), 0.9: np.array([13.0])})
    # pinball: level 0.1, truth above by 2 -> 0.1 * 2; level 0.9, truth below by 3 -> 0.1 * 3
    assert scores["CRPS"] == pytest.approx((2 * 0.2 + 2 * 0.3) / 2)
    assert scores["wQL"] == pytest.approx((2 * 0.2 + 2 * 0.3) / 2 / 10)
    median = quantile_metrics(np.array([0.0, 4.0]), {0.5: np.array([1.0, 2.0])})
    assert median["CRPS"] == pytest.approx(0.5 * (1 + 2) / 2 * 2)  # at the median: the MAE
    assert median["wQL"] == pytest.approx((1 + 2) / 4)


def test_channel_metrics_one_row_per_channel_and_checks_shapes():
    truth = np.stack([np.array([[1.0, 2.0, 4.0]]), np.array([[5.0, 5.0, 5.0]])], axis=-1)  # [1, 3, 2]
    forecast = np.full_like(truth, 2.0)
    table = channel_metrics(truth, forecast, ["a", "b"], quantile_forecasts={0.5: forecast})
    assert table.index.tolist() == ["a", "b"]
    assert table.loc["a", "MAE"] == pytest.approx(1.0) and table.loc["b", "MAE"] == pytest.approx(3.0)
    assert table.loc["b", "CRPS"] == pytest.approx(3.0)
    with pytest.raises(InputError, match="differs"):
        point_metrics(np.zeros(3), np.zeros(2))
    with pytest.raises(InputError, match="3 column names"):
        channel_metrics(truth, forecast, ["a", "b", "c"])
