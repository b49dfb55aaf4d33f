"""Long context (forecast/context.py): no leakage, pieces == whole, save/load of the carried state, the training
reading pattern, bad context_length values, and an observation 2,000 steps back reaching the forecast."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from forecast import ForecastNetConfig, MemoryForecaster, MemoryForecastNet
from forecast.context import (Geometry, carried_state, check_context_length, context_forecasts, context_roll_out,
                              parse_context_length, state_at, training_data, whole_series)
from forecast.data import prepare_protocol
from memorycore import InputError


# a backbone that matters from the start (no linear path, random init), a daily cycle so that phases are exercised
TINY = dict(lookback=24, horizon=8, d_model=16, heads=2, patch_len=8, stride=4, chunk_size=4, epochs=1,
            max_steps_per_epoch=4, lr=3e-3, linear_path=False, init="random", verbose=False, device="cpu")


def series(n=1200, seed=0):
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"load": np.sin(2 * np.pi * t / 24) + 0.3 * rng.standard_normal(n),
                         "temp": np.cos(2 * np.pi * t / 150) + 0.3 * rng.standard_normal(n)},
                        index=pd.date_range("2024-01-01", periods=n, freq="h"))


@pytest.fixture(scope="module", params=["all", 96])
def fitted(request):
    data = series()
    return MemoryForecaster(context_length=request.param, **TINY).fit(data), data


def scaled(model, data):
    return model.scaler_.transform(data.to_numpy())


@pytest.mark.parametrize("bad", [0, 23, -96, 1.5, True, "ALL", "full", "96", [96]])
def test_bad_context_length_is_one_input_error(bad):
    with pytest.raises(InputError, match=r"context_length must be None .* 'all' .* integer >= lookback \(24\)"):
        MemoryForecaster(context_length=bad, **TINY).fit(series(300))
    with pytest.raises(InputError, match="--context-length must be an integer number of steps or 'all'"):
        parse_context_length("lots")
    assert parse_context_length("ALL") == "all" and parse_context_length("512") == 512
    check_context_length(None, 96), check_context_length("all", 96), check_context_length(96, 96)


def test_a_context_longer_than_the_training_rows_is_refused():
    with pytest.raises(InputError, match="context_length=5000 needs"):
        MemoryForecaster(context_length=5000, **TINY).fit(series(1200))


def test_no_leakage_changing_values_after_the_origin_changes_no_forecast(fitted):
    model, data = fitted
    values, phases = scaled(model, data), model.phases_at(data.index)
    starts = np.array([600, 700, 900])
    before = context_forecasts(model.network_, values, phases, starts)
    origin = 600 + model.lookback
    changed = values.copy()
    changed[origin:] += 50.0 * np.random.default_rng(1).standard_normal(changed[origin:].shape)
    after = context_forecasts(model.network_, changed, phases, starts)
    np.testing.assert_array_equal(before[0], after[0])  # the forecast at that origin is unchanged, bit for bit
    assert not np.allclose(before[1:], after[1:])  # later origins read the changed values
    # the memory does read the series beyond the lookback window: a change 60 steps before the window moves it
    earlier = values.copy()
    earlier[600 - 60] += 50.0
    assert not np.allclose(context_forecasts(model.network_, earlier, phases, starts[:1]), before[:1])


@pytest.mark.parametrize("fitted", ["all"], indirect=True)  # an integer context reads only its last steps
def test_all_reads_from_the_first_row(fitted):
    model, data = fitted
    values, phases = scaled(model, data), model.phases_at(data.index)
    first = values.copy()
    first[2] += 50.0  # 900 steps before the window
    assert not np.allclose(context_forecasts(model.network_, first, phases, np.array([900])),
                           context_forecasts(model.network_, values, phases, np.array([900])))


def test_a_pattern_2000_steps_back_reaches_the_forecast_only_with_all():
    """What the window cannot see, the memory has read: with "all" an observation 2,000 steps before the window
    moves the forecast; with an integer context (here 96 steps) it does not.

    Forecasting such a pattern *well* is not reached yet: on a series of random levels that recur once 2,000 steps
    later (the experiment in docs/forecasting.md, "Long context"), the trained "all" model scored test MSE 0.679
    against 0.671 for lookback only, so that test is not here."""
    values = np.random.default_rng(0).standard_normal((2600, 1))
    start = 2400
    moved = values.copy()
    moved[start - 2000] += 5.0
    for context, reaches in (("all", True), (96, False)):
        params = MemoryForecaster(context_length=context, **{**TINY, "cycle_length": 0}).get_params()
        torch.manual_seed(0)
        network = MemoryForecastNet(ForecastNetConfig.from_params(params, n_channels=1, cycle_length=0))
        before, after = (context_forecasts(network, v, None, np.array([start])) for v in (values, moved))
        assert (not np.array_equal(before, after)) == reaches, context


def test_pieces_equal_whole_for_the_streamed_context(fitted):
    model, data = fitted
    network, values = model.network_, scaled(model, data)
    geometry = Geometry.of(network)
    step = geometry.chunk * geometry.stride
    cut = 40 * step  # a chunk boundary
    first_phase = int(model.phases_at(data.index[:1])[0])
    cut_phase = int(model.phases_at(data.index[cut:cut + 1])[0])
    tensor = torch.as_tensor(values, dtype=torch.float32)
    with torch.no_grad():
        carried = carried_state(network, tensor, cut)
        whole = context_roll_out(network, values, first_phase, 20)
        pieces = context_roll_out(network, values[cut:], cut_phase, 20, states=carried)
        whole_state = state_at(network, tensor, len(values))
        piece_state = state_at(network, tensor[cut:], len(values) - cut, carried)
    np.testing.assert_allclose(pieces, whole, rtol=1e-5, atol=1e-5)
    if model.context_length == "all":
        for a, b in zip(whole_state, piece_state):
            for x, y in zip(a.weights + a.momentum, b.weights + b.momentum):
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    # the estimator: predict() after fit (the carried state) is the forecast of the whole series
    np.testing.assert_allclose(model.predict().to_numpy(), model.predict(data).to_numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.predict(h=20).to_numpy(), model.predict(data, h=20).to_numpy(), rtol=1e-5,
                               atol=1e-5)


def test_save_load_keeps_the_carried_state(fitted, tmp_path):
    model, data = fitted
    loaded = MemoryForecaster.load(model.save(tmp_path / "context.safetensors"))
    assert loaded.context_length == model.context_length
    if model.context_length == "all":
        assert loaded.context_state_ is not None
        for a, b in zip(model.context_state_, loaded.context_state_):
            for x, y in zip(a.weights + a.momentum, b.weights + b.momentum):
                torch.testing.assert_close(x, y)
    pd.testing.assert_frame_equal(loaded.predict(), model.predict(), rtol=1e-5, atol=1e-6)  # float32 weights
    assert loaded.evaluate(data)["mse"] == pytest.approx(model.evaluate(data)["mse"], rel=1e-6)


def test_training_reads_as_prediction_does(fitted):
    """Without dropout, a training batch's loss (truncated streams from the carried states) equals its loss in eval
    mode (one stream from row 0): training meets the reading pattern of test time."""
    model, data = fitted
    network = model.network_
    values = scaled(model, data)
    prepared = prepare_protocol(data, model.lookback, model.horizon, "ratio")
    phases = whole_series(prepared, model.split_phases(data.index, prepared))
    train, _, loss = training_data(network, values, phases, prepared.split, torch.nn.functional.mse_loss,
                                   torch.nn.functional.mse_loss)
    batch = next(iter(DataLoader(train, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))))
    dropout = [m for m in network.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in dropout]
    try:
        for m in dropout:
            m.p = 0.0
        with torch.no_grad():
            training_loss = loss(network.train(), batch)
            eval_loss = loss(network.eval(), batch)
    finally:
        for m, p in zip(dropout, rates):
            m.p = p
        network.eval()
    assert training_loss.item() == pytest.approx(eval_loss.item(), rel=1e-5)


def test_lookback_only_is_unchanged():
    """context_length=None (the default) trains and predicts as before: no carried state, the lookback window."""
    data = series(600)
    model = MemoryForecaster(**TINY).fit(data)
    assert model.context_length is None and model.context_state_ is None and len(model.last_window_) == 24


def test_forecasts_from_windows_alone_are_refused_with_a_context(fitted):
    model, _ = fitted
    with pytest.raises(InputError, match="reads a context"):
        model.forecast_scaled(np.zeros((1, model.lookback, 2)), phases=np.zeros(1, dtype=int))
    with pytest.raises(InputError, match="reads a context"):
        model.forecast_series_scaled(np.zeros((1, model.lookback)), np.zeros(1, dtype=int), phases=np.zeros(1))
