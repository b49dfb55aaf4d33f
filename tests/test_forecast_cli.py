"""Every `forecast` command through typer's CliRunner, including bad input (one stderr line, exit code 2)."""

import io

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from cli import app
from forecast import MemoryForecaster
from tests.test_forecast_model import _one_thread  # noqa: F401  (autouse: one torch thread)

TINY = ["--lookback", "24", "--horizon", "8", "--epochs", "1", "--max-steps", "8", "--d-model", "16", "--heads",
        "2", "--blocks", "1", "--quiet", "--threads", "1"]


def write_series(path, n=300, **overrides):
    t = np.arange(n)
    noise = 0.1 * np.random.default_rng(0).standard_normal((2, n))  # a noiseless daily cycle would score MSE 0
    frame = pd.DataFrame({"date": pd.date_range("2024-01-01", periods=n, freq="h").astype(str),
                          "load": np.sin(2 * np.pi * t / 24) + noise[0],
                          "temp": np.cos(2 * np.pi * t / 12) + 3 + noise[1]})
    for column, values in overrides.items():
        frame[column] = values
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def runner():
    try:
        return CliRunner(mix_stderr=False)
    except TypeError:  # click >= 8.2 always keeps stderr apart
        return CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, runner, _one_thread):
    folder = tmp_path_factory.mktemp("cli")
    data = write_series(folder / "series.csv")
    model = folder / "model.safetensors"
    result = runner.invoke(app, ["forecast", "fit", "--data", str(data), "--out", str(model), *TINY])
    assert result.exit_code == 0, result.stderr
    return data, model, result


def test_fit_writes_a_model_and_prints_the_table(trained):
    data, model, result = trained
    assert model.is_file()
    assert "memory forecaster" in result.stdout and "ridge baseline" in result.stdout
    assert "test split (ratio protocol, 53 windows" in result.stdout  # 60 test rows + 24 - 24 - 8 + 1
    coverage = [line for line in result.stdout.splitlines() if line.startswith("80% interval")]
    assert len(coverage) == 1 and coverage[0].endswith("of the test values inside")


def test_predict_to_csv_and_stdout(trained, runner, tmp_path):
    data, model, _ = trained
    out = tmp_path / "forecast.csv"
    result = runner.invoke(app, ["forecast", "predict", "--model", str(model), "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    forecast = pd.read_csv(out, index_col=0, parse_dates=True)
    assert forecast.shape == (8, 2) and list(forecast.columns) == ["load", "temp"]
    assert forecast.index[0] == pd.Timestamp("2024-01-13 12:00")  # 300 hours after the start
    result = runner.invoke(app, ["forecast", "predict", "--model", str(model), "--horizon", "12"])
    assert result.exit_code == 0 and len(result.stdout.strip().splitlines()) == 13


def test_predict_with_quantiles(trained, runner, tmp_path):
    data, model, _ = trained
    out = tmp_path / "bands.csv"
    result = runner.invoke(app, ["forecast", "predict", "--model", str(model), "--data", str(data), "--out", str(out),
                                 "--quantiles", "0.1, 0.9"])
    assert result.exit_code == 0, result.stderr
    forecast = pd.read_csv(out, index_col=0)
    assert list(forecast.columns) == ["load", "temp", "load_q0.1", "temp_q0.1", "load_q0.9", "temp_q0.9"]
    assert (forecast["load_q0.1"] <= forecast["load_q0.9"]).all()
    for levels, expected in (("0.1,1.5", "must lie in [0.01, 0.99]"), ("low,high", "must be numbers")):
        result = runner.invoke(app, ["forecast", "predict", "--model", str(model), "--quantiles", levels])
        assert_one_line_error(result, expected)
    result = runner.invoke(app, ["forecast", "predict", "--model", str(model), "--quantiles", "0.5",
                                 "--horizon", "12"])
    assert_one_line_error(result, "calibrated for up to horizon = 8 steps")


def test_evaluate_prints_mse_and_mae(trained, runner):
    data, model, _ = trained
    result = runner.invoke(app, ["forecast", "evaluate", "--model", str(model), "--data", str(data)])
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "MSE" in lines[1] and "MAE" in lines[1] and lines[2].startswith("memory forecaster")
    mse, mae = map(float, lines[2].split()[-2:])
    expected = MemoryForecaster.load(model).evaluate(str(data))
    assert (mse, mae) == (pytest.approx(expected["mse"], abs=1e-4), pytest.approx(expected["mae"], abs=1e-4))
    coverage = float(result.stdout.split("80% interval")[1].split("%")[0].split()[-1])
    assert coverage == pytest.approx(100 * expected["interval_coverage"], abs=0.1)


def test_plot_writes_a_png(trained, runner, tmp_path):
    data, model, _ = trained
    out = tmp_path / "plot.png"
    result = runner.invoke(app, ["forecast", "plot", "--model", str(model), "--data", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("horizon,title", [(None, "8-step forecast from"),
                                           ("20", "20-step forecast from 2024-01-13 11:00:00 (no interval")])
def test_plot_title_names_the_steps_drawn(trained, runner, tmp_path, monkeypatch, horizon, title):
    """The title counts the steps asked for (a rolled-out forecast has no calibrated interval, and says so)."""
    import forecast.plots

    data, model, _ = trained
    drawn = {}
    monkeypatch.setattr(forecast.plots, "plot_forecast",
                        lambda history, forecast, path, title: drawn.update(forecast=forecast, title=title))
    extra = [] if horizon is None else ["--horizon", horizon]
    result = runner.invoke(app, ["forecast", "plot", "--model", str(model), "--data", str(data), "--out",
                                 str(tmp_path / "p.png"), *extra])
    assert result.exit_code == 0, result.stderr
    assert drawn["title"].startswith(title) and len(drawn["forecast"]) == int(horizon or 8)
    assert ("load_q0.1" in drawn["forecast"]) == (horizon is None)


def test_predict_ignores_columns_the_model_does_not_use(trained, runner, tmp_path):
    data, model, _ = trained
    other = tmp_path / "with_site.csv"
    pd.read_csv(data).assign(site="north", extra=1.0).to_csv(other, index=False)
    result = runner.invoke(app, ["forecast", "predict", "--model", str(model), "--data", str(other)])
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines()[0].split(",")[1:] == ["load", "temp"]


def test_fill_interpolate_lets_nan_data_train(runner, tmp_path):
    values = np.sin(np.arange(300) / 4.0)
    values[50] = np.nan
    data = write_series(tmp_path / "gappy.csv", load=values)
    out = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["forecast", "fit", "--data", str(data), "--out", str(out), "--fill", "interpolate",
                                 "--target", "load", *TINY])
    assert result.exit_code == 0, result.stderr
    model = MemoryForecaster.load(out)
    assert model.columns_ == ["load"] and np.isfinite(model.predict().to_numpy()).all()


def test_every_command_reads_a_date_column_named_on_the_command_line(runner, tmp_path):
    frame = pd.read_csv(write_series(tmp_path / "s.csv")).rename(columns={"date": "when"})
    data = tmp_path / "when.csv"
    frame[["load", "when", "temp"]].to_csv(data, index=False)  # not first, not a known name: it must be named
    model = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["forecast", "fit", "--data", str(data), "--date-column", "when", "--out", str(model),
                                 *TINY])
    assert result.exit_code == 0, result.stderr
    for command in (["evaluate"], ["plot", "--out", str(tmp_path / "p.png")], ["predict"]):
        result = runner.invoke(app, ["forecast", *command, "--model", str(model), "--data", str(data)])
        assert result.exit_code == 0, (command, result.stderr)
    assert result.stdout.splitlines()[0] == "when,load,temp"


def test_long_format_file_in_long_format_out(runner, tmp_path):
    wide = pd.read_csv(write_series(tmp_path / "s.csv"))
    data = tmp_path / "long.csv"
    wide.melt(id_vars="date", var_name="unique_id", value_name="y").rename(columns={"date": "ds"}).to_csv(
        data, index=False)
    model = tmp_path / "m.safetensors"
    result = runner.invoke(app, ["forecast", "fit", "--data", str(data), "--out", str(model), *TINY])
    assert result.exit_code == 0, result.stderr
    for extra in ([], ["--data", str(data)]):
        result = runner.invoke(app, ["forecast", "predict", "--model", str(model), *extra])
        assert result.exit_code == 0, result.stderr
        forecast = pd.read_csv(io.StringIO(result.stdout))
        assert list(forecast.columns) == ["unique_id", "ds", "y"] and len(forecast) == 2 * 8


def bad_inputs(folder):
    """(name, extra arguments, expected message) for files that must be refused with one line."""
    t = np.arange(300)
    frame = pd.DataFrame({"x": t, "load": np.sin(t)})
    frame.to_csv(folder / "nodate.csv", index=False)
    write_series(folder / "text.csv", load=["a"] * 300)
    values = np.sin(t / 3.0)
    values[[10, 20]] = [np.nan, np.inf]
    write_series(folder / "nan.csv", load=values)
    write_series(folder / "short.csv", n=30)
    dates = pd.date_range("2024-01-01", periods=300, freq="h").astype(str).tolist()
    dates[100] = dates[99]
    write_series(folder / "dup.csv", date=dates)
    dates = pd.date_range("2024-01-01", periods=300, freq="h").delete(150).append(
        pd.DatetimeIndex(["2024-02-01"])).astype(str)
    write_series(folder / "gap.csv", date=dates)
    return [
        ("nodate.csv", [], "no date column found"),
        ("text.csv", [], "non-numeric column(s): load"),
        ("nan.csv", [], "NaN/inf values in load (2 value(s), the first at 2024-01-01 10:00:00); clean the data or pass "
                        "--fill interpolate"),
        ("short.csv", [], "too short"),
        ("dup.csv", [], "duplicate timestamp 2024-01-05 03:00:00 (row 100)"),
        ("gap.csv", [], "irregular timestamps"),
        ("series.csv", ["--target", "OT"], "unknown target column(s) 'OT'"),
        ("missing.csv", [], "data file not found"),
        ("series.csv", ["--cycle-length", "daily"], "--cycle-length must be 'auto' or a whole number"),
        ("series.csv", ["--loss", "l3"], "loss must be one of mse, mae, huber"),
        ("series.csv", ["--cycle-amplitude", "big"], "cycle_amplitude must be one of auto, window, fixed"),
    ]


def assert_one_line_error(result, expected):
    assert result.exit_code == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_fit_refuses_bad_input_with_one_line(runner, tmp_path):
    write_series(tmp_path / "series.csv")
    for name, extra, expected in bad_inputs(tmp_path):
        result = runner.invoke(app, ["forecast", "fit", "--data", str(tmp_path / name), "--out",
                                     str(tmp_path / "m.safetensors"), *extra, *TINY])
        assert_one_line_error(result, expected)


def test_model_files_that_are_not_ours(trained, runner, tmp_path):
    data, _, _ = trained
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    for command in ("predict", "evaluate", "plot"):
        out = [] if command == "evaluate" else ["--out", str(tmp_path / "x.out")]
        result = runner.invoke(app, ["forecast", command, "--model", str(junk), "--data", str(data), *out])
        assert_one_line_error(result, "not a readable safetensors model file")
    result = runner.invoke(app, ["forecast", "evaluate", "--model", str(tmp_path / "none.safetensors"), "--data",
                                 str(data)])
    assert_one_line_error(result, "does not exist")


def test_predict_refuses_data_without_the_fitted_columns_and_overwriting_input(trained, runner, tmp_path):
    data, model, _ = trained
    other = tmp_path / "other.csv"
    pd.read_csv(data).drop(columns=["temp"]).to_csv(other, index=False)
    result = runner.invoke(app, ["forecast", "predict", "--model", str(model), "--data", str(other)])
    assert_one_line_error(result, "lacks the fitted column(s) temp")
    before = data.read_bytes()
    result = runner.invoke(app, ["forecast", "predict", "--model", str(model), "--data", str(data), "--out", str(data)])
    assert_one_line_error(result, "is an input file")
    assert data.read_bytes() == before


def test_data_at_another_time_step_than_the_model_is_refused(trained, runner, tmp_path):
    data, model, _ = trained
    quarter_hours = pd.read_csv(data).assign(date=pd.date_range("2024-01-01", periods=300, freq="15min").astype(str))
    quarter_hours.to_csv(tmp_path / "15min.csv", index=False)
    for command in ("predict", "evaluate"):
        result = runner.invoke(app, ["forecast", command, "--model", str(model), "--data", str(tmp_path / "15min.csv")])
        assert_one_line_error(result, "the data's time step is 0 days 00:15:00 but the model was fitted on steps of "
                                      "0 days 01:00:00")


def test_options_out_of_range_are_one_line(trained, runner, tmp_path):
    data, model, _ = trained
    for extra, expected in ((["--threads", "0"], "--threads must be >= 1"), (["--max-steps", "-1"], "--max-steps >= 0"),
                            (["--lookback", "7"], "lookback=7 is too short for patches of 16 steps every 8"),
                            (["--d-model", "30", "--heads", "3"], "must be a multiple of 4")):
        result = runner.invoke(app, ["forecast", "fit", "--data", str(data), "--out", str(tmp_path / "m.safetensors"),
                                     *TINY, *extra])
        assert_one_line_error(result, expected)
    for extra, expected in ((["plot", "--history", "0", "--out", str(tmp_path / "p.png")], "--history must be >= 1"),
                            (["predict", "--quantiles", "nan"], "quantile levels must lie in [0.01, 0.99]"),
                            (["predict", "--horizon", "100000000"], "the last date pandas can hold")):
        result = runner.invoke(app, ["forecast", extra[0], "--model", str(model), *extra[1:]])
        assert_one_line_error(result, expected)
    assert not (tmp_path / "m.safetensors").exists()


def test_a_warning_is_printed_once_though_the_data_is_read_several_times(runner, tmp_path):
    pd.read_csv(write_series(tmp_path / "s.csv")).to_csv(tmp_path / "with_index.csv")  # + pandas' row numbers
    result = runner.invoke(app, ["forecast", "fit", "--data", str(tmp_path / "with_index.csv"), "--out",
                                 str(tmp_path / "m.safetensors"), *TINY])
    assert result.exit_code == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "warning: ignored the first column 'Unnamed: 0': it holds the row numbers pandas writes (to_csv without "
        "index=False)"]


def test_data_far_outside_the_fit_gives_an_error_not_blank_forecasts(trained, runner, tmp_path):
    data, model, _ = trained
    pd.read_csv(data).assign(load=1e300).to_csv(tmp_path / "huge.csv", index=False)
    result = runner.invoke(app, ["forecast", "predict", "--model", str(model), "--data", str(tmp_path / "huge.csv")])
    # beyond the training rows' robust bound: outliers, with nothing left to fill them from
    assert_one_line_error(result, "load: 300 value(s) from 2024-01-01 00:00:00 (1e+300); a column holds no other")


def test_help_has_examples(runner):
    for command in ("fit", "predict", "evaluate", "plot"):
        result = runner.invoke(app, ["forecast", command, "--help"])
        assert result.exit_code == 0 and "Examples" in result.stdout


def test_plot_to_an_unknown_image_format_is_one_clear_line(tmp_path):
    from forecast.plots import plot_forecast
    import pandas as pd
    from memorycore import InputError

    index = pd.date_range("2020-01-01", periods=4, freq="h")
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0]}, index=index)
    with pytest.raises(InputError, match=r"cannot write a \.jpgx image"):
        plot_forecast(frame, frame, tmp_path / "x.jpgx")
    assert not any(tmp_path.iterdir())


def test_fit_without_the_linear_path_and_the_cycle(runner, tmp_path):
    data = write_series(tmp_path / "series.csv")
    out = tmp_path / "plain.safetensors"
    result = runner.invoke(app, ["forecast", "fit", "--data", str(data), "--out", str(out), "--no-linear-path",
                                 "--cycle-length", "0", "--init", "random", "--loss", "huber", *TINY])
    assert result.exit_code == 0, result.stderr
    from forecast.estimator import MemoryForecaster
    model = MemoryForecaster.load(out)
    assert model.network_.linear is None and model.network_.cycle is None and model.cycle_length_ == 0


def test_fit_options_default_to_the_estimators_signature():
    """Every default lives once: `forecast fit` and `genomics fit` show their estimator's."""
    import inspect

    import typer.main

    from genomics import DNAClassifier

    renames = {"seed": "random_state", "max_steps": "max_steps_per_epoch", "blocks": "n_blocks"}
    groups = typer.main.get_command(app).commands
    for group, estimator in (("forecast", MemoryForecaster), ("genomics", DNAClassifier)):
        defaults = {name: p.default for name, p in inspect.signature(estimator).parameters.items()}
        checked = 0
        for option in groups[group].commands["fit"].params:
            name = renames.get(option.name, option.name)
            if name not in defaults:
                name = option.name  # DNAClassifier's blocks is blocks
            if name in defaults:
                expected = defaults[name]
                if option.name == "max_steps":
                    expected = expected or 0  # None and 0 both mean every window
                assert option.default == (str(expected) if option.name == "cycle_length" else expected), option.name
                checked += 1
        assert checked >= 9
