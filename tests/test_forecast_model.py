"""The network and the estimator: learning, predict, save/load, sklearn conventions, GluonTS."""

import copy
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone

from forecast import ForecastNetConfig, MemoryForecaster, MemoryForecastNet
from forecast.baseline import ALPHAS, RidgeBaseline, evaluate_windows
from forecast.data import WindowDataset, cycle_phases, default_cycle_length, prepare_protocol
from forecast.closed_form import closed_form_init
from forecast.estimator import loss_function
from forecast.intervals import QUANTILE_LEVELS, interpolate_quantiles
from forecast.rollout import roll_out
from memorycore import CheckpointError, InputError
from memorycore.training import evaluate_loss

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waiting on a busy 2-core machine (60x faster here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


TINY = dict(lookback=24, horizon=8, d_model=16, heads=2, n_blocks=1, patch_len=8, stride=4, epochs=3,
            batch_size=32, lr=3e-3, verbose=False, device="cpu")


def synthetic(n=400, seed=0):
    """Two noisy seasonal channels, hourly."""
    t = np.arange(n)
    rng = np.random.default_rng(seed)
    values = {"load": np.sin(2 * np.pi * t / 24) + 0.1 * rng.standard_normal(n),
              "temp": 2 * np.cos(2 * np.pi * t / 12) + 5 + 0.1 * rng.standard_normal(n)}
    return pd.DataFrame(values, index=pd.date_range("2024-01-01", periods=n, freq="h", name="date"))


def net_config(*, n_channels: int, cycle_length: int = 0, cycle_amplitude: str = "fixed",
               **params) -> ForecastNetConfig:
    """A network config as MemoryForecaster.fit builds it, from the estimator's parameters."""
    params = MemoryForecaster(cycle_amplitude=cycle_amplitude, **params).get_params()
    return ForecastNetConfig.from_params(params, n_channels=n_channels, cycle_length=cycle_length)


@pytest.fixture(scope="module")
def fitted(_one_thread):
    return MemoryForecaster(**TINY).fit(synthetic())


@pytest.mark.parametrize("channels", ["independent", "mixing"])
@pytest.mark.parametrize("embedding", ["patch", "token"])
@pytest.mark.parametrize("linear_path", [True, False])
@pytest.mark.parametrize("cycle_length", [6, 0])
def test_network_shapes_and_single_channel_path(channels, embedding, linear_path, cycle_length):
    config = net_config(n_channels=3, lookback=16, horizon=8, d_model=16, heads=2, channels=channels,
                               embedding=embedding, chunk_size=8, linear_path=linear_path, cycle_length=cycle_length)
    net = MemoryForecastNet(config).eval()
    assert (net.linear is not None) == linear_path and (net.cycle is not None) == bool(cycle_length)
    if cycle_length:
        net.cycle.data.normal_()
    x, phase = torch.randn(2, 16, 3), torch.tensor([0, 4])
    y = net(x, phase)
    assert y.shape == (2, 8, 3) and torch.isfinite(y).all()
    if channels == "independent":  # channel 1 alone gives the same forecast as inside the batch of channels
        torch.testing.assert_close(net.forecast_series(x[:, :, 1], torch.tensor([1, 1]), phase), y[:, :, 1])
        x_changed = x.clone()
        x_changed[:, :, 0] += 5.0
        torch.testing.assert_close(net(x_changed, phase)[:, :, 1], y[:, :, 1])  # channels do not mix
    if cycle_length:
        assert not torch.allclose(net(x, phase + 1), y)  # the phase matters
        with pytest.raises(ValueError, match="pass the phase"):
            net(x)


@pytest.mark.parametrize("amplitude, scale", [("fixed", 1.0), ("window", 1.0), ("window", 0.5)])
def test_cycle_continues_at_the_right_phase(amplitude, scale):
    """Backbone and linear path silenced: a window that is exactly the cycle (or, with the window amplitude, the cycle
    at half strength) forecasts the cycle's continuation (at that strength)."""
    config = net_config(n_channels=2, lookback=16, horizon=8, d_model=16, heads=2, linear_path=True,
                               cycle_length=6, cycle_amplitude=amplitude)
    net = MemoryForecastNet(config).eval()
    net.linear.weight.data.zero_()
    net.linear.bias.data.zero_()
    table = torch.randn(6, 2)
    net.cycle.data.copy_(table)
    phase = torch.tensor([0, 3, 5])
    steps = torch.arange(24)
    series = scale * table[(phase[:, None] + steps) % 6]  # [3, 24, 2]
    forecast = net(series[:, :16], phase)
    torch.testing.assert_close(forecast, series[:, 16:], atol=1e-5, rtol=1e-5)


def test_default_cycle_length_and_phases():
    hour, quarter, ten = (pd.Timedelta(f).value for f in ("1h", "15min", "10min"))
    assert [default_cycle_length(s) for s in (hour, quarter, ten, pd.Timedelta("1D").value)] == [24, 96, 144, 7]
    assert default_cycle_length(pd.Timedelta("7h").value) == 0 and default_cycle_length(0) == 0
    index = pd.date_range("2024-03-05 21:00", periods=5, freq="h")
    np.testing.assert_array_equal(cycle_phases(index, 24, hour), [21, 22, 23, 0, 1])  # the hour of the day


def test_closed_form_start_is_the_ridge_baseline():
    """Without a cycle, the initialised network forecasts exactly what the ridge baseline does."""
    data = prepare_protocol(synthetic(), 24, 8, "ratio")
    config = net_config(n_channels=2, lookback=24, horizon=8, d_model=16, heads=2, linear_path=True)
    net = MemoryForecastNet(config).eval()
    closed_form_init(net, data, {"train": None, "val": None})
    windows = torch.as_tensor(data.test[None, :24], dtype=torch.float32)
    ridge = RidgeBaseline(net.linear.weight.detach().double().numpy().T, alpha=0.0)
    np.testing.assert_allclose(net(windows).detach().numpy(), ridge.predict(data.test[None, :24]), atol=1e-4)
    best = min(RidgeBaseline.fit_path(data.train, 24, 8, ALPHAS),
               key=lambda model: evaluate_windows(model.predict, data.val, 24, 8)[0])  # the alpha best on val
    np.testing.assert_allclose(net.linear.weight.detach().numpy().T, best.weights, atol=1e-5)


def test_cycle_forecaster_predicts_a_clean_cycle_at_any_hour():
    """A noiseless daily cycle is learnt exactly by the closed-form start: forecasts from histories that end at
    any hour, rolled out past the horizon, follow it (a phase off by one step would not)."""
    t = np.arange(500)
    clean = pd.DataFrame({"a": np.sin(2 * np.pi * t / 24), "b": np.cos(2 * np.pi * t / 24) ** 3},
                         index=pd.date_range("2024-01-01", periods=500, freq="h", name="date"))
    model = MemoryForecaster(**dict(TINY, epochs=1)).fit(clean)
    assert model.cycle_length_ == 24
    for end in (200, 211, 237):
        forecast = model.predict(clean.iloc[:end], h=20)
        np.testing.assert_allclose(forecast.to_numpy(), clean.iloc[end:end + 20].to_numpy(), atol=1e-3)


@pytest.mark.parametrize("loss", ["mse", "mae"])
def test_tiny_fit_lowers_validation_loss(loss):
    """From a random start (no closed-form help), training lowers the validation MSE whatever the training loss."""
    model = MemoryForecaster(**TINY, init="random", loss=loss).fit(synthetic())
    data = model.prepare(synthetic())
    phases = model.split_phases(synthetic().index, data)
    val = WindowDataset(data.val, 24, 8, phases["val"])
    torch.manual_seed(model.random_state)  # the initial weights fit started from
    untrained = MemoryForecastNet(model.network_.config)
    before = evaluate_loss(untrained, loss_function(loss), val, device="cpu")
    after = evaluate_loss(model.network_, loss_function(loss), val, device="cpu")
    assert after < 0.5 * before
    assert model.history_.val_loss and min(model.history_.val_loss) == pytest.approx(after, rel=1e-4)


def test_training_keeps_the_closed_form_start_unless_it_improves_on_it(fitted):
    data = fitted.prepare(synthetic())
    val = WindowDataset(data.val, 24, 8, fitted.split_phases(synthetic().index, data)["val"])
    kept = evaluate_loss(fitted.network_, loss_function("mse"), val, device="cpu")
    start = MemoryForecaster(**dict(TINY, epochs=1, lr=1e-12)).fit(synthetic())  # lr ~0: the start itself
    start_loss = evaluate_loss(start.network_, loss_function("mse"), val, device="cpu")
    assert kept <= start_loss + 1e-6
    assert (fitted.history_.best_epoch == -1) == (min(fitted.history_.val_loss) >= start_loss)
    spoiled = MemoryForecaster(**dict(TINY, epochs=1, lr=0.3)).fit(synthetic())  # training only makes it worse
    assert spoiled.history_.best_epoch == -1 and spoiled.history_.val_loss[0] > 2 * spoiled.start_val_loss_
    spoiled_loss = evaluate_loss(spoiled.network_, loss_function("mse"), val, device="cpu")
    assert spoiled_loss == pytest.approx(spoiled.start_val_loss_, rel=1e-5)
    assert spoiled_loss == pytest.approx(start_loss, rel=1e-5)  # the closed-form start, whatever the lr


def test_predict_shape_timestamps_and_columns(fitted):
    forecast = fitted.predict()
    assert forecast.shape == (8, 2) and list(forecast.columns) == ["load", "temp"]
    expected = pd.date_range("2024-01-17 16:00", periods=8, freq="h")  # 400 hours after 2024-01-01 00:00
    assert (forecast.index == expected).all() and forecast.index.name == "date"
    longer = fitted.predict(synthetic(), h=20)  # rolled out past the horizon
    assert longer.shape == (20, 2)
    np.testing.assert_allclose(longer.iloc[:8].to_numpy(), forecast.to_numpy(), rtol=1e-5)
    history = synthetic().iloc[:200]
    assert fitted.predict(history).index[0] == history.index[-1] + pd.Timedelta("1h")


def test_predict_long_format_in_and_out(fitted):
    long = synthetic().rename_axis("ds").reset_index().melt(id_vars="ds", var_name="unique_id", value_name="y")
    forecast = fitted.predict(long)
    assert list(forecast.columns) == ["unique_id", "ds", "y"] and len(forecast) == 16
    np.testing.assert_allclose(forecast.loc[forecast.unique_id == "temp", "y"], fitted.predict()["temp"], rtol=1e-5)


def test_forecast_follows_the_seasonality(fitted):
    truth = synthetic(408).iloc[400:]
    error = np.abs(fitted.predict().to_numpy() - truth.to_numpy()).mean()
    seasonal_naive = np.abs(synthetic().iloc[-24:-16].to_numpy() - truth.to_numpy()).mean()  # a day earlier
    assert error < 0.8 * seasonal_naive  # ~0.08 against ~0.13: at the noise's own MAE (0.1 * sqrt(2 / pi))


def test_quantile_forecasts_are_calibrated_on_validation(fitted):
    forecast = fitted.predict(quantiles=[0.1, 0.15, 0.2, 0.9])
    assert list(forecast.columns) == ["load", "temp"] + [f"{c}_q{q}" for q in (0.1, 0.15, 0.2, 0.9)
                                                         for c in ("load", "temp")]
    pd.testing.assert_frame_equal(forecast[["load", "temp"]], fitted.predict())
    # bound = point + the residual quantile of that step and channel, in the data's units
    scale = fitted.scaler_.scale
    offset = forecast["temp_q0.9"] - forecast["temp"]
    np.testing.assert_allclose(offset, fitted.residual_quantiles_[QUANTILE_LEVELS.index(0.9), :, 1] * scale[1],
                               rtol=1e-4, atol=1e-6)
    middle = (forecast["load_q0.1"] + forecast["load_q0.2"]) / 2  # 0.15 lies halfway between stored levels
    np.testing.assert_allclose(forecast["load_q0.15"], middle, rtol=1e-6)
    assert (forecast["load_q0.1"] <= forecast["load_q0.9"]).all()
    # on the calibration windows 80% of the residuals fall between the 0.1 and 0.9 quantiles, step by step
    wide = synthetic()
    prepared = fitted.prepare(wide)
    residuals = -fitted.split_errors(prepared.val, fitted.split_phases(wide.index, prepared)["val"])
    low, high = fitted.residual_quantiles([0.1, 0.9])
    inside = ((residuals >= low) & (residuals <= high)).mean(axis=0)
    assert inside.shape == (8, 2) and np.all(np.abs(inside - 0.8) < 0.05)


def test_quantile_forecasts_in_long_format_and_bad_levels(fitted):
    long = synthetic().rename_axis("ds").reset_index().melt(id_vars="ds", var_name="unique_id", value_name="y")
    forecast = fitted.predict(long, quantiles=[0.25, 0.75])
    assert list(forecast.columns) == ["unique_id", "ds", "y", "y_q0.25", "y_q0.75"]
    wide = fitted.predict(quantiles=[0.25])
    np.testing.assert_allclose(forecast.loc[forecast.unique_id == "temp", "y_q0.25"], wide["temp_q0.25"], rtol=1e-5)
    with pytest.raises(InputError, match=r"must lie in \[0.01, 0.99\]"):
        fitted.predict(quantiles=[0.5, 1.0])
    with pytest.raises(InputError, match="calibrated for up to horizon = 8 steps, not 9"):
        fitted.predict(h=9, quantiles=[0.5])
    old = copy.copy(fitted)
    old.residual_quantiles_ = None  # a model file saved before the calibration existed
    with pytest.raises(InputError, match="refit it"):
        old.predict(quantiles=[0.5])


def test_evaluate_scores_every_test_window(fitted):
    scores = fitted.evaluate(synthetic())
    assert scores["windows"] == 80 + 24 - 24 - 8 + 1
    assert 0 < scores["mse"] < 0.03 and 0 < scores["mae"] < 0.14  # measured 0.014 / 0.096 (scaled units)


def test_save_load_gives_identical_predictions(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.safetensors")
    loaded = MemoryForecaster.load(path)
    pd.testing.assert_frame_equal(loaded.predict(), fitted.predict())
    pd.testing.assert_frame_equal(loaded.predict(synthetic(), h=12), fitted.predict(synthetic(), h=12))
    pd.testing.assert_frame_equal(loaded.predict(quantiles=[0.1, 0.9]), fitted.predict(quantiles=[0.1, 0.9]))
    assert loaded.get_params() == fitted.get_params() and loaded.columns_ == fitted.columns_
    assert b"pickle" not in path.read_bytes()[:64]


def test_load_rejects_foreign_and_corrupt_files(fitted, tmp_path):
    from memorycore.checkpoint import save_checkpoint

    (tmp_path / "junk.safetensors").write_bytes(b"not a model at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        MemoryForecaster.load(tmp_path / "junk.safetensors")
    other = save_checkpoint(tmp_path / "other.safetensors", {"w": torch.zeros(2)}, {"class": "DNAClassifier"})
    with pytest.raises(CheckpointError, match="holds a DNAClassifier"):
        MemoryForecaster.load(other)
    broken = save_checkpoint(tmp_path / "broken.safetensors", {"w": torch.zeros(2)}, {"class": "MemoryForecaster"})
    with pytest.raises(CheckpointError, match="corrupt"):
        MemoryForecaster.load(broken)
    with pytest.raises(CheckpointError, match="does not exist"):
        MemoryForecaster.load(tmp_path / "missing.safetensors")


def test_sklearn_conventions(fitted):
    params = fitted.get_params()
    copy = clone(fitted)
    assert copy.get_params() == params and not hasattr(copy, "network_")
    copy.set_params(horizon=4, d_model=8)
    assert copy.horizon == 4 and fitted.horizon == 8
    restored = pickle.loads(pickle.dumps(fitted))
    pd.testing.assert_frame_equal(restored.predict(), fitted.predict())
    from sklearn.exceptions import NotFittedError
    with pytest.raises(NotFittedError):
        MemoryForecaster().predict()


def test_same_seed_same_model():
    small = dict(TINY, epochs=1)
    first = MemoryForecaster(**small).fit(synthetic()).predict()
    second = MemoryForecaster(**small).fit(synthetic()).predict()
    pd.testing.assert_frame_equal(first, second)


def test_bad_parameters_and_inputs(fitted):
    with pytest.raises(InputError, match="lookback must be a positive integer"):
        MemoryForecaster(lookback=0).fit(synthetic())
    with pytest.raises(InputError, match="divisible by heads"):
        MemoryForecaster(d_model=10, heads=4).fit(synthetic())
    with pytest.raises(InputError, match="channels must be one of independent, mixing"):
        MemoryForecaster(channels="both").fit(synthetic())
    with pytest.raises(InputError, match="loss must be one of mse, mae, huber"):
        MemoryForecaster(loss="l3").fit(synthetic())
    with pytest.raises(InputError, match="cycle_length must be 'auto' or an integer"):
        MemoryForecaster(cycle_length=-1).fit(synthetic())
    with pytest.raises(InputError, match="pass phases="):
        fitted.forecast_scaled(np.zeros((1, 24, 2)))
    with pytest.raises(InputError, match="too short"):
        MemoryForecaster(**TINY).fit(synthetic(40))
    with pytest.raises(InputError, match="lacks the fitted column"):
        fitted.predict(synthetic()[["load"]])
    with pytest.raises(InputError, match="needs lookback = 24"):
        fitted.predict(synthetic().iloc[:10])
    with pytest.raises(InputError, match="must be a positive integer, got True"):
        fitted.predict(h=True)
    with pytest.raises(InputError, match="a path to a CSV or a pandas DataFrame .* got ndarray"):
        fitted.predict(synthetic().to_numpy())


def test_gluonts_evaluation_runs_on_our_model(fitted):
    from gluonts.dataset.split import split
    from gluonts.ev.metrics import MAE, MSE
    from gluonts.evaluation import Evaluator, make_evaluation_predictions
    from gluonts.model import evaluate_model
    from gluonts.model.forecast import QuantileForecast, SampleForecast

    from forecast.gluonts import MemoryPredictor, to_gluonts

    series = synthetic()
    dataset = to_gluonts(series)
    predictor = MemoryPredictor(fitted)
    forecasts, truths = make_evaluation_predictions(dataset, predictor)
    forecasts, truths = list(forecasts), list(truths)
    assert all(isinstance(f, QuantileForecast) for f in forecasts)
    assert [f.item_id for f in forecasts] == ["load", "temp"]
    expected = fitted.predict(series.iloc[:-8], quantiles=[0.1, 0.9])
    np.testing.assert_allclose(forecasts[1].mean, expected["temp"], rtol=1e-4)
    np.testing.assert_allclose(forecasts[1].quantile(0.1), expected["temp_q0.1"], rtol=1e-4)
    np.testing.assert_allclose(forecasts[0].quantile(0.9), expected["load_q0.9"], rtol=1e-4)
    assert forecasts[0].start_date == pd.Period(expected.index[0], freq="h")
    aggregate, per_item = Evaluator()(truths, forecasts)
    manual_mse = np.mean([(f.mean - series[f.item_id].iloc[-8:].to_numpy()) ** 2 for f in forecasts])
    assert aggregate["MSE"] == pytest.approx(manual_mse, rel=1e-4) and len(per_item) == 2
    assert 0 < aggregate["Coverage[0.9]"] <= 1 and aggregate["mean_wQuantileLoss"] > 0
    # point forecasts on request, and past the calibrated horizon
    assert isinstance(MemoryPredictor(fitted, quantiles=None).predict_item(dataset[0]), SampleForecast)
    assert isinstance(MemoryPredictor(fitted, prediction_length=12).predict_item(dataset[0]), SampleForecast)

    _, template = split(dataset, offset=-24)
    metrics = evaluate_model(predictor, test_data=template.generate_instances(prediction_length=8, windows=3),
                             metrics=[MSE(), MAE()], axis=None)
    assert np.isfinite(metrics.to_numpy()).all() and metrics.shape == (1, 2)


def test_gluonts_rejects_unknown_items(fitted):
    from forecast.gluonts import MemoryPredictor

    predictor = MemoryPredictor(fitted)
    item = {"start": pd.Period("2024-01-01", freq="h"), "target": np.zeros(30), "item_id": "wind"}
    with pytest.raises(InputError, match="not a fitted column"):
        predictor.predict_item(item)
    with pytest.raises(InputError, match="prediction_length must be a positive integer"):
        MemoryPredictor(fitted, prediction_length=-3)
    daily = {"start": pd.Period("2024-01-01", freq="D"), "target": np.zeros(30), "item_id": "load"}
    with pytest.raises(InputError, match="the data's time step is 1 days .* fitted on steps of 0 days 01:00:00"):
        predictor.predict_item(daily)


def test_auto_amplitude_keeps_the_start_that_is_better_on_validation():
    small = dict(TINY, epochs=1, lr=1e-12)  # lr ~0: the fitted networks are their closed-form starts
    starts = {amplitude: MemoryForecaster(**small, cycle_amplitude=amplitude).fit(synthetic()).start_val_loss_
              for amplitude in ("window", "fixed")}
    auto = MemoryForecaster(**small, cycle_amplitude="auto").fit(synthetic())
    assert auto.network_.config.cycle_amplitude == min(starts, key=starts.get)
    assert auto.start_val_loss_ == pytest.approx(min(starts.values()), rel=1e-5)


def test_fit_leaves_the_callers_random_generator_alone_and_draws_a_seed_for_none():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model = MemoryForecaster(**dict(TINY, epochs=1, max_steps_per_epoch=2, random_state=None)).fit(synthetic())
    model.evaluate(synthetic())
    torch.testing.assert_close(torch.rand(3), expected)


@pytest.mark.parametrize("params, message", [(dict(max_steps_per_epoch=-1), "max_steps_per_epoch must be a positive"),
                                             (dict(patience=0), "patience must be a positive integer")])
def test_training_caps_must_be_positive_or_none(params, message):
    with pytest.raises(InputError, match=message):
        MemoryForecaster(**dict(TINY, **params)).fit(synthetic())


def test_roll_out_feeds_each_forecast_back_as_input():
    """A one-shot forecaster that repeats the window's last value plus one: rolled out, the values count up."""
    def one_shot(windows, phases):
        return np.repeat(windows[:, -1:] + 1, 3, axis=1)  # horizon 3

    windows = np.zeros((2, 5, 1))
    forecast = roll_out(one_shot, windows, steps=7, horizon=3)
    np.testing.assert_array_equal(forecast[0, :, 0], [1, 1, 1, 2, 2, 2, 3])
    seen = []
    roll_out(lambda w, p: seen.append(p.tolist()) or np.zeros((2, 3, 1)), windows, 7, 3, torch.tensor([0, 5]))
    assert seen == [[0, 5], [3, 8], [6, 11]]  # each window starts 3 steps (a horizon) later


def test_quantiles_interpolate_between_the_stored_levels():
    table = np.broadcast_to(np.asarray(QUANTILE_LEVELS)[:, None, None], (len(QUANTILE_LEVELS), 4, 2))
    offsets = interpolate_quantiles(table, [0.1, 0.15, 0.99], steps=3, horizon=4)
    assert offsets.shape == (3, 3, 2)
    np.testing.assert_allclose(offsets[:, 0, 0], [0.1, 0.15, 0.99])
    with pytest.raises(InputError, match="calibrated for up to horizon = 4 steps, not 5"):
        interpolate_quantiles(table, [0.5], steps=5, horizon=4)
