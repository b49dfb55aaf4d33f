"""The network and the estimator: learning, predict, save/load, sklearn conventions, GluonTS."""

import pickle

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone

from forecast import ForecastNetConfig, MemoryForecaster, MemoryForecastNet
from forecast.data import prepare_protocol
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


@pytest.fixture(scope="module")
def fitted(_one_thread):
    return MemoryForecaster(**TINY).fit(synthetic())


@pytest.mark.parametrize("channels", ["independent", "mixing"])
@pytest.mark.parametrize("embedding", ["patch", "token"])
def test_network_shapes_and_single_channel_path(channels, embedding):
    config = ForecastNetConfig(n_channels=3, lookback=16, horizon=8, d_model=16, heads=2, channels=channels,
                               embedding=embedding, chunk_size=8)
    net = MemoryForecastNet(config).eval()
    x = torch.randn(2, 16, 3)
    y = net(x)
    assert y.shape == (2, 8, 3) and torch.isfinite(y).all()
    if channels == "independent":  # channel 1 alone gives the same forecast as inside the batch of channels
        torch.testing.assert_close(net.forecast_series(x[:, :, 1], torch.tensor([1, 1])), y[:, :, 1])
        x_changed = x.clone()
        x_changed[:, :, 0] += 5.0
        torch.testing.assert_close(net(x_changed)[:, :, 1], y[:, :, 1])  # channels do not mix


def test_tiny_fit_lowers_validation_loss(fitted):
    data = prepare_protocol(synthetic(), 24, 8, "ratio")
    torch.manual_seed(fitted.random_state)  # the initial weights fit started from
    untrained = MemoryForecastNet(fitted.network_.config)
    loss = lambda model, batch: torch.nn.functional.mse_loss(model(batch[0]), batch[1])  # noqa: E731
    before = evaluate_loss(untrained, loss, data.windows("val", 24, 8), device="cpu")
    after = evaluate_loss(fitted.network_, loss, data.windows("val", 24, 8), device="cpu")
    assert after < 0.5 * before
    assert fitted.history_.val_loss and min(fitted.history_.val_loss) == pytest.approx(after, rel=1e-4)


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
    naive = np.abs(synthetic().iloc[-1].to_numpy() - truth.to_numpy()).mean()
    assert error < naive


def test_evaluate_scores_every_test_window(fitted):
    scores = fitted.evaluate(synthetic())
    assert scores["windows"] == 80 + 24 - 24 - 8 + 1
    assert 0 < scores["mse"] < 0.5 and 0 < scores["mae"] < 0.6


def test_save_load_gives_identical_predictions(fitted, tmp_path):
    path = fitted.save(tmp_path / "model.safetensors")
    loaded = MemoryForecaster.load(path)
    pd.testing.assert_frame_equal(loaded.predict(), fitted.predict())
    pd.testing.assert_frame_equal(loaded.predict(synthetic(), h=12), fitted.predict(synthetic(), h=12))
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
    with pytest.raises(InputError, match="too short"):
        MemoryForecaster(**TINY).fit(synthetic(40))
    with pytest.raises(InputError, match="lacks the fitted column"):
        fitted.predict(synthetic()[["load"]])
    with pytest.raises(InputError, match="needs lookback = 24"):
        fitted.predict(synthetic().iloc[:10])


def test_gluonts_evaluation_runs_on_our_model(fitted):
    from gluonts.dataset.split import split
    from gluonts.ev.metrics import MAE, MSE
    from gluonts.evaluation import Evaluator, make_evaluation_predictions
    from gluonts.model import evaluate_model
    from gluonts.model.forecast import SampleForecast

    from forecast.gluonts import MemoryPredictor, to_gluonts

    series = synthetic()
    dataset = to_gluonts(series)
    predictor = MemoryPredictor(fitted)
    forecasts, truths = make_evaluation_predictions(dataset, predictor)
    forecasts, truths = list(forecasts), list(truths)
    assert all(isinstance(f, SampleForecast) for f in forecasts) and [f.item_id for f in forecasts] == ["load", "temp"]
    expected = fitted.predict(series.iloc[:-8])
    np.testing.assert_allclose(forecasts[1].mean, expected["temp"], rtol=1e-4)
    assert forecasts[0].start_date == pd.Period(expected.index[0], freq="h")
    aggregate, per_item = Evaluator()(truths, forecasts)
    manual_mse = np.mean([(f.mean - series[f.item_id].iloc[-8:].to_numpy()) ** 2 for f in forecasts])
    assert aggregate["MSE"] == pytest.approx(manual_mse, rel=1e-4) and len(per_item) == 2

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
