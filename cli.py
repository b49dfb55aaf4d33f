"""memorycore command line: ``python cli.py ...`` or ``memorycore ...``.

Thin by design: parse the arguments, call the library, print. Results go to stdout or ``--out``; logs and progress
bars go to stderr. Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import ast
import functools
import runpy
import sys
import warnings
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer

from memorycore.config import estimator_defaults
from memorycore.errors import InputError, MemorycoreError
from memorycore.files import check_writable, write_text_atomic

app = typer.Typer(
    help="Test-time-learning memory: forecasting, DNA classification and benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
forecast_app = typer.Typer(help="Forecast multivariate time series (ETT, ECL, Traffic, Weather or your CSV).",
                           no_args_is_help=True)
genomics_app = typer.Typer(help="Classify DNA sequences (GenomicBenchmarks folders, CSV/TSV, FASTA, FASTA + BED).",
                           no_args_is_help=True)
bench_app = typer.Typer(help="Run the benchmark scripts of bench/.", no_args_is_help=True)
lm_app = typer.Typer(help="Train language models on text, generate and score text (memorycore.lm.MemoryLM).",
                     no_args_is_help=True)
app.add_typer(forecast_app, name="forecast")
app.add_typer(genomics_app, name="genomics")
app.add_typer(lm_app, name="lm")
app.add_typer(bench_app, name="bench")

F = TypeVar("F", bound=Callable)


def friendly_errors(command: F) -> F:
    """Turn the library's input errors into one line on stderr and exit code 2, and its warnings into one line each
    (Python would add the file, line number and source line of the ``warnings.warn`` call)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                shown: set[str] = set()  # data read several times would repeat its warnings

                def one_line(message, *_, **__) -> None:
                    if str(message) not in shown:
                        shown.add(str(message))
                        typer.echo(f"warning: {message}", err=True)

                warnings.showwarning = one_line
                # numpy's overflow / invalid-value notes: what they lead to (a NaN loss or forecast) is an error
                # of its own that says what to do
                warnings.filterwarnings("ignore", r"(overflow|invalid value|divide by zero) encountered",
                                        RuntimeWarning)
                return command(*args, **kwargs)
        except (MemorycoreError, FileNotFoundError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


@forecast_app.callback()
def forecast_main() -> None:
    """Forecast multivariate time series (ETT, ECL, Traffic, Weather or your CSV)."""


BUNDLED_ETTH1 = Path(__file__).resolve().parent / "datasets" / "ETTh1" / "ETTh1.csv.gz"
# the estimators' defaults, read from their signatures (importing them would import torch before --help)
_FORECASTER = estimator_defaults(Path(__file__).resolve().parent / "forecast" / "estimator.py", "MemoryForecaster")
_CLASSIFIER = estimator_defaults(Path(__file__).resolve().parent / "genomics" / "estimator.py", "DNAClassifier")
_DATA_HELP = "CSV or .csv.gz: a date column + numeric columns, or the long format unique_id, ds, y."
_MODEL_OPTION = typer.Option(..., "--model", help="A model written by `forecast fit`.")
_OUTLIERS_OPTION = typer.Option(
    "missing", help="Sentinels (-9999) and values over 50 MADs from a channel's training median are reported, then "
                    "treated as missing and filled (missing), kept (keep) or refused (error).")
_ALLOW_NEGATIVE_OPTION = typer.Option(
    False, help="Do not clip at 0 the forecasts and intervals of channels never negative in training.")
_TARGET_OPTION = typer.Option(None, help="Column(s) to forecast (repeat the option); default all.")
_DATE_COLUMN_OPTION = typer.Option(None, help="Timestamp column; default 'date' or the like.")
_FILL_OPTION = typer.Option(None, help="'interpolate' fills NaN/inf linearly in time.")
_ALLOW_IRREGULAR_OPTION = typer.Option(False, help="Accept duplicate/uneven timestamps (rows as steps).")


def _read_options(date_column: str | None, target: list[str] | None, fill: str | None,
                  allow_irregular: bool) -> dict:
    return {"date_column": date_column, "target": target or None, "fill": fill, "allow_irregular": allow_irregular}


def _check_out(out: Path, *inputs: Path | None) -> None:
    """Before any work: ``--out`` must be writable and must not be one of the inputs."""
    for given in inputs:
        if given is not None and Path(given).resolve() == Path(out).resolve():
            raise InputError(f"--out {out} is an input file; write the result elsewhere")
    check_writable(out)


def training_checkpoint(out: Path) -> Path:
    """Where `fit --resume` finds a killed run's training checkpoint: beside --out (removed once the model is saved)."""
    return out.with_name(out.name.removesuffix(".safetensors") + ".training.safetensors")


def _fit_and_save(model, out: Path, resume: bool, *data, **options) -> None:
    """``model.fit(*data, **options)`` writing a training checkpoint beside ``out`` (continued from with --resume),
    then the model to ``out``; the checkpoint goes once the model is saved."""
    checkpoint = training_checkpoint(out)
    model.fit(*data, **options, checkpoint=checkpoint, resume=resume)
    model.save(out)
    checkpoint.unlink(missing_ok=True)


def _torch_threads(threads: int) -> None:
    import torch

    if threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


_THREADS_OPTION = typer.Option(
    None, "--threads", show_default=False,
    help="CPU threads for torch; default memorycore's rule: 1, the fastest for these model sizes (README: "
         "CPU threads).")


def _check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise InputError(f"--threads must be >= 1, got {threads}")


_RESUME_OPTION = typer.Option(False, "--resume", help="Continue a killed run of the same command from its training "
                                                      "checkpoint (<out>.training.safetensors, written during training "
                                                      "and removed once the model is saved).")


def _load_forecaster(path: Path, threads: int | None):
    """A model written by `forecast fit`, to run on --threads CPU threads (default: the thread rule)."""
    from forecast.estimator import MemoryForecaster

    _check_threads(threads)
    model = MemoryForecaster.load(path)
    return model if threads is None else model.set_params(n_threads=threads)


def _metrics_table(rows: list[tuple[str, float, float]], title: str) -> str:
    lines = [title, f"{'model':<28}{'MSE':>10}{'MAE':>10}"]
    lines += [f"{name:<28}{mse:>10.4f}{mae:>10.4f}" for name, mse, mae in rows]
    return "\n".join(lines)


def _test_report(model, data, scores: dict, title: str) -> str:
    """The test-split table of a fitted forecaster beside the ridge baseline, and its 80% interval's coverage."""
    rows = [("memory forecaster", scores["mse"], scores["mae"]), _ridge_row(model, data)]
    report = _metrics_table(rows, title)
    if "interval_coverage" in scores:
        report += (f"\n80% interval (predict --quantiles 0.1,0.9): {scores['interval_coverage']:.1%} of the test "
                   "values inside")
    if "channels" in scores:
        season = model.cycle_length_ or 1
        report += "\n" + _units_table(scores["channels"], f"in the data's units (MASE against the seasonal naive "
                                                          f"forecast, season {season} steps):")
    return report


def _units_table(table, title: str, label: str = "channel", most: int = 12) -> str:
    """Rows of metrics in the data's units (NaN shown as '-': undefined, e.g. MAPE with a zero truth)."""
    width = max([len(label)] + [len(str(name)) for name in table.index[:most]]) + 2
    lines = [title, f"{label:<{width}}" + "".join(f"{name:>10}" for name in table.columns)]
    for name, row in table.iloc[:most].iterrows():
        lines.append(f"{str(name):<{width}}" + "".join(f"{value:>10.4g}" if value == value else f"{'-':>10}"
                                                       for value in row))
    if len(table) > most:
        lines.append(f"... and {len(table) - most} more (the mean of all: "
                     + ", ".join(f"{name} {value:.4g}" for name, value in table.mean().items()) + ")")
    return "\n".join(lines)


def _ridge_row(model, data) -> tuple[str, float, float]:
    from forecast.baseline import ridge_benchmark

    prepared = model.prepare(data)
    mse, mae, alpha = ridge_benchmark(prepared, model.lookback, model.horizon)
    return (f"ridge baseline (alpha={alpha:g})", mse, mae)


def _cycle_length(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise InputError(f"--cycle-length must be 'auto' or a whole number of steps (0: none), got {text!r}") from None


@forecast_app.command("fit")
@friendly_errors
def forecast_fit(
    data: Optional[Path] = typer.Option(None, help=f"{_DATA_HELP} Default: the bundled ETTh1."),
    horizon: int = typer.Option(_FORECASTER["horizon"], help="Steps to forecast."),
    lookback: int = typer.Option(_FORECASTER["lookback"], help="Past steps the model reads."),
    context_length: Optional[str] = typer.Option(
        None, help="Steps before each forecast origin that the memory reads (>= --lookback), or 'all': the whole "
                   "series, the memory learning as it reads (docs/forecasting.md, Long context). Default: the "
                   "lookback window."),
    epochs: int = typer.Option(_FORECASTER["epochs"],
                               help="Passes over the training windows (early stopping may end sooner)."),
    max_steps: Optional[int] = typer.Option(
        _FORECASTER["max_steps_per_epoch"] or 0,
        help="Optimiser steps per epoch at most (a random subset of windows); 0 = every window."),
    batch_size: int = typer.Option(_FORECASTER["batch_size"], help="Windows per optimiser step."),
    lr: float = typer.Option(_FORECASTER["lr"], help="Peak learning rate (AdamW, warm-up then cosine)."),
    d_model: int = typer.Option(_FORECASTER["d_model"], help="Model width."),
    heads: int = typer.Option(_FORECASTER["heads"], help="Neural memory heads (must divide --d-model)."),
    blocks: int = typer.Option(_FORECASTER["n_blocks"], help="Memory + EinFFT blocks."),
    dropout: float = typer.Option(_FORECASTER["dropout"], help="Dropout in the blocks and the head."),
    chunk_size: int = typer.Option(_FORECASTER["chunk_size"],
                                   help="Neural memory chunk (tokens sharing one gradient base)."),
    channels: str = typer.Option(_FORECASTER["channels"], help="independent (one sequence per channel) or mixing."),
    linear_path: bool = typer.Option(_FORECASTER["linear_path"],
                                     help="A linear lookback->horizon path beside the memory backbone."),
    cycle_length: str = typer.Option(
        str(_FORECASTER["cycle_length"]),
        help="Learned periodic component: steps per cycle, 'auto' (one day of steps) or 0 (none)."),
    cycle_amplitude: str = typer.Option(
        _FORECASTER["cycle_amplitude"],
        help="window (the cycle scaled to its strength in each input window), fixed (CycleNet) or auto "
             "(the one whose closed-form start is better on validation)."),
    init: str = typer.Option(_FORECASTER["init"], help="closed_form (cycle means + ridge start) or random."),
    loss: str = typer.Option(_FORECASTER["loss"],
                             help="Training loss: mse, mae or huber (early stopping uses validation MSE)."),
    weight_decay: float = typer.Option(_FORECASTER["weight_decay"], help="AdamW weight decay of the weight matrices."),
    protocol: str = typer.Option(_FORECASTER["protocol"],
                                 help="Split: auto (by file name), etth, ettm or ratio (70/10/20)."),
    target: Optional[list[str]] = _TARGET_OPTION,
    date_column: Optional[str] = _DATE_COLUMN_OPTION,
    fill: Optional[str] = _FILL_OPTION,
    allow_irregular: bool = _ALLOW_IRREGULAR_OPTION,
    outliers: str = _OUTLIERS_OPTION,
    allow_negative: bool = _ALLOW_NEGATIVE_OPTION,
    out: Path = typer.Option(Path("runs/forecast/model.safetensors"), help="Where to write the model."),
    device: str = typer.Option(_FORECASTER["device"], help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(_FORECASTER["random_state"], help="Random seed."),
    threads: Optional[int] = _THREADS_OPTION,
    resume: bool = _RESUME_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train the memory forecaster, save it, and print its test MSE/MAE beside the ridge baseline.

    Examples:

        python cli.py forecast fit                                  # bundled ETTh1, horizon 96

        python cli.py forecast fit --data ../shared/datasets/weather/weather.csv.gz --horizon 192 --allow-irregular
    """
    import time

    from forecast.context import parse_context_length
    from forecast.estimator import MemoryForecaster

    if threads is not None and threads < 1 or max_steps is not None and max_steps < 0:
        raise InputError(f"--threads must be >= 1 and --max-steps >= 0 (0: every window), got {threads} and "
                         f"{max_steps}")
    data = data if data is not None else BUNDLED_ETTH1
    _check_out(out, data)
    model = MemoryForecaster(
        lookback=lookback, horizon=horizon, context_length=parse_context_length(context_length),
        d_model=d_model, heads=heads, n_blocks=blocks, chunk_size=chunk_size,
        channels=channels, dropout=dropout, epochs=epochs, batch_size=batch_size, lr=lr,
        max_steps_per_epoch=max_steps or None, linear_path=linear_path, cycle_length=_cycle_length(cycle_length),
        cycle_amplitude=cycle_amplitude, init=init, loss=loss, weight_decay=weight_decay,
        protocol=protocol, random_state=seed, device=device, n_threads=threads, verbose=not quiet)
    start = time.perf_counter()
    _fit_and_save(model, out, resume, data, **_read_options(date_column, target, fill, allow_irregular),
                  outliers=outliers, allow_negative=allow_negative)
    seconds = time.perf_counter() - start
    scores = model.evaluate(data, units=True)
    typer.echo(_test_report(model, data, scores, f"{Path(data).name}: test split ({model.protocol_} protocol, "
                                                 f"{scores['windows']} windows, lookback {lookback}, horizon "
                                                 f"{horizon}, scaled values), trained in {seconds:.0f} s"))
    typer.echo(f"model written to {out}")


@forecast_app.command("predict")
@friendly_errors
def forecast_predict(
    model_path: Path = _MODEL_OPTION,
    data: Optional[Path] = typer.Option(None, help=f"{_DATA_HELP} Default: forecast after the end of the data "
                                                     "given to fit."),
    horizon: Optional[int] = typer.Option(None, help="Steps to forecast; default the model's horizon."),
    out: Optional[Path] = typer.Option(None, help="CSV to write; default stdout."),
    quantiles: Optional[str] = typer.Option(
        None, help="Comma-separated levels in [0.01, 0.99] (e.g. 0.1,0.9 for an 80% interval): adds a column "
                   "<channel>_q<level> per level, calibrated on the validation split's residuals."),
    threads: Optional[int] = _THREADS_OPTION,
) -> None:
    """Forecast the steps after the end of the data, as CSV (timestamps, then one column per channel).

    Examples:

        python cli.py forecast predict --model runs/forecast/model.safetensors --out forecast.csv

        python cli.py forecast predict --model runs/forecast/model.safetensors --quantiles 0.1,0.9
    """
    from forecast.data import is_long_format
    model = _load_forecaster(model_path, threads)
    if out is not None:
        _check_out(out, data, model_path)
    levels = None if quantiles is None else [level.strip() for level in quantiles.split(",")]
    forecast = model.predict(data, h=horizon, quantiles=levels)
    text = forecast.to_csv(index=not is_long_format(forecast))
    if out is None:
        typer.echo(text, nl=False)
    else:
        write_text_atomic(out, text)
        typer.echo(f"{len(forecast)} rows written to {out}", err=True)


@forecast_app.command("evaluate")
@friendly_errors
def forecast_evaluate(
    model_path: Path = _MODEL_OPTION,
    data: Path = typer.Option(..., help=_DATA_HELP),
    protocol: Optional[str] = typer.Option(None, help="Split to score; default the one the model was trained with."),
    threads: Optional[int] = _THREADS_OPTION,
) -> None:
    """Print the test MSE/MAE of a model (every window of the protocol's test split) beside the ridge baseline.

    Examples:

        python cli.py forecast evaluate --model runs/forecast/model.safetensors --data datasets/ETTh1/ETTh1.csv.gz
    """
    model = _load_forecaster(model_path, threads)
    scores = model.evaluate(data, protocol=protocol, units=True)
    typer.echo(_test_report(model, data, scores, f"test split of {data.name} ({scores['windows']} windows, horizon "
                                                 f"{model.horizon}, scaled values)"))


@forecast_app.command("backtest")
@friendly_errors
def forecast_backtest(
    data: Optional[Path] = typer.Option(None, help=f"{_DATA_HELP} Default: the bundled ETTh1."),
    model_path: Optional[Path] = typer.Option(
        None, "--model", help="Take the settings of a model written by `forecast fit` (not its weights: the model "
                              "is fitted anew on the rows before the cutoffs); default: fit's defaults."),
    n_windows: int = typer.Option(5, help="Cutoffs (forecast origins) at the end of the data."),
    step_size: Optional[int] = typer.Option(None, help="Rows between cutoffs; default the horizon."),
    refit: bool = typer.Option(False, help="Fit again at every cutoff instead of once at the first."),
    horizon: Optional[int] = typer.Option(None, help="Steps forecast from each cutoff; default the model's."),
    lookback: Optional[int] = typer.Option(None, help="Past steps the model reads; default the model's."),
    epochs: Optional[int] = typer.Option(None, help="Passes over the training windows per fit; default the model's."),
    max_steps: Optional[int] = typer.Option(
        None, help="Optimiser steps per epoch at most; default the model's (0 = every window)."),
    target: Optional[list[str]] = _TARGET_OPTION,
    date_column: Optional[str] = _DATE_COLUMN_OPTION,
    fill: Optional[str] = _FILL_OPTION,
    allow_irregular: bool = _ALLOW_IRREGULAR_OPTION,
    outliers: str = _OUTLIERS_OPTION,
    allow_negative: bool = _ALLOW_NEGATIVE_OPTION,
    out: Optional[Path] = typer.Option(
        None, help="CSV of the forecasts against the actuals: unique_id, ds, cutoff, y, forecast, forecast_q<level>."),
    plot: Optional[Path] = typer.Option(None, help="Image of MASE against the cutoff (.png, .pdf, .svg)."),
    seed: int = typer.Option(_FORECASTER["random_state"], help="Random seed."),
    threads: int = typer.Option(1, help="CPU threads for torch (1 suits the default small model)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Backtest as neuralforecast's cross_validation: forecasts from cutoffs at the end of the data, each from the
    rows up to it only, scored per cutoff and per series in the data's units (MASE, sMAPE, MAE, RMSE, CRPS, ...).

    The last window ends at the last row, cutoffs lie --step-size rows apart; one fit at the first (--refit: each).

    Examples:

        python cli.py forecast backtest --n-windows 5 --plot backtest.png     # bundled ETTh1, one fit

        python cli.py forecast backtest --data sales.csv --horizon 24 --n-windows 10 --step-size 24 --refit --out cv.csv

        python cli.py forecast backtest --model runs/forecast/model.safetensors --data datasets/ETTh1/ETTh1.csv.gz
    """
    import torch

    from forecast.backtest import backtest_metrics
    from forecast.data import default_cycle_length, read_series, step_nanoseconds
    from forecast.estimator import MemoryForecaster
    from forecast.metrics import CRPS_LEVELS
    from forecast.plots import plot_backtest

    if threads < 1 or max_steps is not None and max_steps < 0:
        raise InputError(f"--threads must be >= 1 and --max-steps >= 0 (0: every window), got {threads} and "
                         f"{max_steps}")
    torch.set_num_threads(threads)
    data = data if data is not None else BUNDLED_ETTH1
    for path in (out, plot):
        if path is not None:
            _check_out(path, data, model_path)
    model = MemoryForecaster() if model_path is None else MemoryForecaster(**MemoryForecaster.load(model_path)
                                                                           .get_params())
    overrides = {name: value for name, value in (("horizon", horizon), ("lookback", lookback),
                                                              ("epochs", epochs)) if value is not None}
    if max_steps is not None:
        overrides["max_steps_per_epoch"] = max_steps or None
    model.set_params(**overrides, random_state=seed, verbose=not quiet)
    options = _read_options(date_column, target, fill, allow_irregular)
    frame = model.cross_validation(data, n_windows, step_size, refit, quantiles=list(CRPS_LEVELS), **options,
                                   outliers=outliers, allow_negative=allow_negative)
    history = read_series(data, **options)
    cycle = model.cycle_length
    season = (default_cycle_length(step_nanoseconds(history.index)) if cycle == "auto" else int(cycle)) or 1
    errors = backtest_metrics(frame, history, season, outliers)
    cutoffs = frame["cutoff"].drop_duplicates().sort_values()
    per_series = backtest_metrics(frame.assign(cutoff=cutoffs.iloc[0]), history, season, outliers)
    per_series = per_series.droplevel("cutoff")
    steps = model.horizon
    typer.echo(_units_table(errors[["MASE", "sMAPE", "wQL"]].groupby(level="cutoff").mean(),
                            f"{Path(data).name}: {len(cutoffs)} cutoffs, horizon {steps}, "
                            f"{'refitted at each cutoff' if refit else f'fitted once on the rows to {cutoffs.iloc[0]}'}"
                            f"; mean over series, MASE against the seasonal naive forecast (season {season} steps):",
                            label="cutoff", most=len(cutoffs)))
    typer.echo(_units_table(per_series[["MAE", "RMSE", "MAPE", "sMAPE", "MASE", "CRPS", "wQL"]],
                            "per series over all cutoffs, in the data's units:", label="series"))
    if out is not None:
        write_text_atomic(out, frame.to_csv(index=False))
        typer.echo(f"{len(frame)} rows written to {out}", err=True)
    if plot is not None:
        plot_backtest(errors, plot, title=f"{Path(data).name}: MASE of {steps}-step forecasts by cutoff")
        typer.echo(f"plot written to {plot}", err=True)


@forecast_app.command("plot")
@friendly_errors
def forecast_plot(
    model_path: Path = _MODEL_OPTION,
    data: Optional[Path] = typer.Option(None, help=f"{_DATA_HELP} Default: the training data's end."),
    out: Path = typer.Option(Path("forecast.png"), help="Image to write (.png, .pdf, .svg)."),
    horizon: Optional[int] = typer.Option(None, help="Steps to forecast; default the model's horizon."),
    history: Optional[int] = typer.Option(
        None, help="Past steps to draw; default 2 x lookback (without --data: the lookback the model keeps)."),
    threads: Optional[int] = _THREADS_OPTION,
) -> None:
    """Draw the recent history and the forecast after it, one panel per channel.

    Examples:

        python cli.py forecast plot --model runs/forecast/model.safetensors --out forecast.png
    """
    from forecast.plots import plot_forecast
    from forecast.ragged import is_ragged, long_forecast_to_wide

    if history is not None and history < 1:
        raise InputError(f"--history must be >= 1 past step, got {history}")
    model = _load_forecaster(model_path, threads)
    _check_out(out, data, model_path)
    past = model.last_window_ if data is None else model.read_like_fit(data)
    steps = horizon or model.horizon
    # an 80% interval where the model has calibrated quantiles for these steps
    band = getattr(model, "residual_quantiles_", None) is not None and steps <= model.horizon
    levels = [0.1, 0.9] if band else None
    if is_ragged(past):  # long data whose series end on different dates: each forecast after its own end
        forecast = long_forecast_to_wide(model.predict(data, h=horizon, quantiles=levels))
    else:
        forecast = model.predict(past, h=horizon, quantiles=levels)
    shown = past.iloc[-(history or 2 * model.lookback):]
    title = f"{steps}-step forecast from {shown.index[-1]}"
    if steps > model.horizon:
        title += f" (no interval: the model calibrated {model.horizon} steps)"
    plot_forecast(shown, forecast, out, title=title)
    typer.echo(f"plot written to {out}", err=True)



@genomics_app.callback()
def genomics_main() -> None:
    """Classify DNA sequences (GenomicBenchmarks folders, CSV/TSV, FASTA, FASTA + BED)."""


# --------------------------------------------------------------------------------------------------- genomics commands
_GENOMICS_INPUT_HELP = ("A GenomicBenchmarks folder (<name>/{train,test}/<class>/*.txt), a CSV/TSV with seq and label "
                        "columns, or FASTA.")


@genomics_app.command("fit")
@friendly_errors
def genomics_fit(
    train: Path = typer.Option(..., "--train", help=_GENOMICS_INPUT_HELP),
    out: Path = typer.Option(..., "--out", help="Where to write the model (.safetensors)."),
    labels: Path | None = typer.Option(None, "--labels", help="Two-column 'id label' file (FASTA input)."),
    split: str = typer.Option("train", help="Split to read from a GenomicBenchmarks folder."),
    epochs: int = typer.Option(_CLASSIFIER["epochs"],
                               help="Maximum training epochs (early stopping on a 10% validation split)."),
    dim: int = typer.Option(_CLASSIFIER["dim"], help="Model width."),
    blocks: int = typer.Option(_CLASSIFIER["blocks"], help="Number of NeuralMemory blocks."),
    max_length: int | None = typer.Option(_CLASSIFIER["max_length"],
                                          help="Longest input read at once; default: longest training sequence."),
    batch_size: int = typer.Option(_CLASSIFIER["batch_size"], help="Training batch size."),
    lr: float = typer.Option(_CLASSIFIER["lr"], help="Peak learning rate."),
    reverse_complement: bool = typer.Option(_CLASSIFIER["reverse_complement"],
                                            help="Average both strands (reverse-complement invariant model)."),
    device: str = typer.Option(_CLASSIFIER["device"], help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(_CLASSIFIER["random_state"], help="Random seed."),
    kind: str = typer.Option("neural", "--model",
                             help="neural (DNAClassifier: the options above) or kmer (2-7-mer counts + logistic "
                                  "regression: seconds, docs/genomics.md)."),
    threads: Optional[int] = _THREADS_OPTION,
    resume: bool = _RESUME_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a DNA classifier and save it.

    Examples:

        python cli.py genomics fit --train human_nontata_promoters --out m.safetensors

        python cli.py genomics fit --train seqs.fa --labels labels.tsv --out m.safetensors --epochs 5

        python cli.py genomics fit --train train.csv --model kmer --out kmer.safetensors   # the k-mer linear model
    """
    import time

    from genomics import DNAClassifier, KmerClassifier, load_sequences

    _check_threads(threads)
    if kind not in ("neural", "kmer"):
        raise InputError(f"--model must be neural or kmer, got {kind!r}")
    _check_out(out, train, labels)
    data = load_sequences(train, labels=labels, split=split, require_labels=True)
    if kind == "kmer":
        start = time.perf_counter()
        kmers = KmerClassifier(random_state=seed).fit(data.sequences, data.labels)
        kmers.save(out)
        typer.echo(f"saved {out}: {len(data)} sequences, classes {', '.join(map(str, kmers.classes_))}; "
                   f"{kmers.k_min}-{kmers.k_max}-mer linear model, {time.perf_counter() - start:.1f} s")
        return
    classifier = DNAClassifier(dim=dim, blocks=blocks, max_length=max_length, epochs=epochs, batch_size=batch_size,
                               lr=lr, reverse_complement=reverse_complement, device=device, n_threads=threads,
                               random_state=seed, verbose=not quiet)
    _fit_and_save(classifier, out, resume, data.sequences, data.labels)
    history = classifier.history_
    best = f", best epoch {history.best_epoch + 1}" if history.val_loss else ""
    typer.echo(f"saved {out}: {len(data)} sequences, classes {', '.join(map(str, classifier.classes_))}; "
               f"max_length {classifier.max_length_}{best}, {history.seconds:.1f} s")


@genomics_app.command("classify")
@friendly_errors
def genomics_classify(
    input: Path = typer.Argument(..., help="FASTA to classify (streamed), or a CSV/TSV or GenomicBenchmarks folder."),
    model: Path = typer.Option(..., "--model", help="A model written by 'genomics fit'."),
    bed: Path | None = typer.Option(None, "--bed", help="Classify these BED regions of the FASTA instead."),
    out: Path | None = typer.Option(None, "--out", help="TSV to write (default: stdout)."),
    split: str = typer.Option("test", help="Split to read from a GenomicBenchmarks folder."),
    batch_size: int = typer.Option(512, help="Records held in memory at once."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = _THREADS_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Write one TSV row per sequence: id, predicted class, and a probability per class. With --bed the rows keep
    the regions' coordinates, BED6 first: chrom, start, end, id, score (1000 x the predicted class's probability),
    strand, then predicted and the probabilities.

    Examples:

        python cli.py genomics classify seqs.fa --model m.safetensors --out preds.tsv

        python cli.py genomics classify genome.fa --bed regions.bed --model m.safetensors --out regions.tsv
    """
    from genomics.inference import load_classifier

    _check_threads(threads)
    if out is not None:
        _check_out(out, input, bed, model)
    classifier = load_classifier(model, device=device, n_threads=threads)
    records, total = _genomics_records(input, bed, split)
    if out is None:
        windowed = _write_predictions(sys.stdout, classifier, records, total, quiet, batch_size, str(input),
                                      bed is not None)
    else:
        from memorycore.files import atomic_path

        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as stream:
            windowed = _write_predictions(stream, classifier, records, total, quiet, batch_size, str(input),
                                          bed is not None)
    if windowed:
        typer.echo(f"warning: {windowed} sequence(s) longer than the model's max_length {classifier.max_length_} were "
                   f"classified by averaging overlapping windows", err=True)


@genomics_app.command("evaluate")
@friendly_errors
def genomics_evaluate(
    model: Path = typer.Option(..., "--model", help="A model written by 'genomics fit'."),
    data: Path = typer.Option(..., "--data", help=_GENOMICS_INPUT_HELP),
    labels: Path | None = typer.Option(None, "--labels", help="Two-column 'id label' file (FASTA input)."),
    bed: Path | None = typer.Option(None, "--bed", help="Evaluate on these BED regions of the FASTA."),
    split: str = typer.Option("test", help="Split to read from a GenomicBenchmarks folder."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = _THREADS_OPTION,
) -> None:
    """Print accuracy, macro F1, Matthews correlation, AUROC, AUPRC and the confusion matrix on labelled data.

    Examples:

        python cli.py genomics evaluate --model m.safetensors --data human_nontata_promoters

        python cli.py genomics evaluate --model m.safetensors --data seqs.fa --labels labels.tsv
    """
    from genomics import load_sequences
    from genomics.inference import evaluate_classifier, load_classifier

    _check_threads(threads)
    classifier = load_classifier(model, device=device, n_threads=threads)
    dataset = load_sequences(data, labels=labels, bed=bed, split=split, require_labels=True)
    typer.echo(evaluate_classifier(classifier, dataset).to_text())


@genomics_app.command("scan")
@friendly_errors
def genomics_scan(
    fasta: Path = typer.Argument(..., help="FASTA to scan (uncompressed: read by random access through its index)."),
    model: Path = typer.Option(..., "--model", help="A model written by 'genomics fit' (neural or kmer)."),
    window: Optional[int] = typer.Option(None, "--window", show_default=False,
                                         help="Window width in bases; default the model's training length."),
    step: Optional[int] = typer.Option(None, "--step", show_default=False,
                                       help="Bases between window starts; default --window (windows that do not "
                                            "overlap, as bedGraph tools want)."),
    bed: Optional[Path] = typer.Option(None, "--bed", help="Scan only inside these BED regions."),
    score_class: Optional[str] = typer.Option(None, "--class", show_default=False,
                                              help="Class whose probability is the score; default the last class "
                                                   "(e.g. positive, or 1)."),
    output_format: str = typer.Option("bedgraph", "--format",
                                      help="bedgraph (chrom, start, end, score) or bed (BED6: name = predicted "
                                           "class, score = 1000 x probability)."),
    out: Optional[Path] = typer.Option(None, "--out", help="File to write (default: stdout)."),
    batch_size: int = typer.Option(512, help="Windows read and scored at once (memory is constant in the genome's "
                                             "size)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    threads: Optional[int] = _THREADS_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Score windows along a genome: one bedGraph (or BED) line per window with its chromosome coordinates.

    Windows start every --step bases (0-based, half-open); one more window ends at each sequence's end; windows made
    only of N (assembly gaps) are skipped. Lines come in the FASTA's order (sort -k1,1
    -k2,2n before bedGraphToBigWig).

    Examples:

        python cli.py genomics scan genome.fa --model m.safetensors --out scores.bedgraph

        python cli.py genomics scan genome.fa --model m.safetensors --window 251 --step 50 --bed regions.bed
    """
    import time

    from genomics.inference import load_classifier
    from genomics.scan import scan, scan_segments

    _check_threads(threads)
    if output_format not in ("bedgraph", "bed"):
        raise InputError(f"--format must be bedgraph or bed, got {output_format!r}")
    for name, value in (("--window", window), ("--step", step), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if out is not None:
        _check_out(out, fasta, bed, model)
    classifier = load_classifier(model, device=device, n_threads=threads)
    classes = [str(c) for c in classifier.classes_]
    if score_class is not None and score_class not in classes:
        raise InputError(f"--class {score_class} is not a class of the model; it knows {', '.join(classes)}")
    column = classes.index(score_class) if score_class is not None else len(classes) - 1
    window = window or classifier.max_length_
    step = step or window
    total = sum(segment.end - segment.start for segment in scan_segments(fasta, bed))  # checks the inputs first
    start, lines, skipped = time.perf_counter(), 0, 0

    def write(stream) -> None:
        nonlocal lines, skipped
        if output_format == "bedgraph":
            stream.write(f'track type=bedGraph name="{model.stem}" description="P({classes[column]}) of {window} bp '
                         f'windows every {step} bp"\n')
        with _genomics_progress(quiet) as progress:
            task = progress.add_task("scanning", total=total)
            log = _scan_log(total, start, enabled=not quiet and not sys.stderr.isatty())

            def advance(done: int) -> None:
                progress.update(task, completed=done)
                log(done)

            for batch in scan(classifier, fasta, window=window, step=step, bed=bed, batch_size=batch_size,
                              on_progress=advance):
                skipped += batch.skipped
                lines += len(batch.start)
                score = batch.proba[:, column]
                if output_format == "bedgraph":
                    rows = (f"{c}\t{b}\t{e}\t{p:.4f}\n"
                            for c, b, e, p in zip(batch.chrom, batch.start, batch.end, score))
                else:
                    names = classifier.classes_[batch.proba.argmax(axis=1)]
                    rows = (f"{c}\t{b}\t{e}\t{_tsv_field(n)}\t{round(1000 * p)}\t{strand}\n" for c, b, e, n, p, strand
                            in zip(batch.chrom, batch.start, batch.end, names, score, batch.strand))
                stream.writelines(rows)

    if out is None:
        write(sys.stdout)
    else:
        from memorycore.files import atomic_path

        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as stream:
            write(stream)
    typer.echo(f"{lines} windows of {window} bp every {step} bp scored in {time.perf_counter() - start:.1f} s"
               + (f" ({skipped} all-N windows skipped)" if skipped else "") + (f"; written to {out}" if out else ""),
               err=True)


def _scan_log(total: int, start: float, *, enabled: bool):
    """Where stderr is not a terminal (the bar would show nothing): a line at every tenth of the bases scanned."""
    import time

    from memorycore.training import format_duration

    reported = 0

    def log(done: int) -> None:
        nonlocal reported
        tenth = 10 * done // max(total, 1)
        if enabled and tenth > reported:
            reported = tenth
            elapsed = time.perf_counter() - start
            typer.echo(f"scanning: {done:,} of {total:,} bp ({done / total:.0%}), {format_duration(elapsed)} elapsed, "
                       f"about {format_duration(elapsed * (total - done) / done)} left", err=True)

    return log


def _write_predictions(stream, classifier, records, total: int, quiet: bool, batch_size: int, source: str,
                       bed: bool = False) -> int:
    """Write the TSV rows while advancing a progress bar; return how many records were classified by windows.
    ``bed``: the records' ids are BedRegions, written as BED6 columns first."""
    from genomics.inference import classify_records

    windowed = 0
    with _genomics_progress(quiet) as progress:
        task = progress.add_task("classifying", total=total)
        columns = ["id", "predicted"] + [f"prob_{_tsv_field(c)}" for c in classifier.classes_]
        header = "\t".join(["#chrom", "start", "end", "id", "score", "strand"] + columns[1:] if bed else columns) + "\n"
        for ids, proba, n_windowed in classify_records(classifier, records(progress, task), batch_size=batch_size,
                                                       source=source):
            # The header waits for the first classified batch: input rejected up front leaves stdout empty.
            stream.write(header)
            header = ""
            windowed += n_windowed
            predicted = classifier.classes_[proba.argmax(axis=1)]
            for record_id, label, row in zip(ids, predicted, proba):
                cells = [_tsv_field(label)] + [f"{p:.6f}" for p in row]
                if bed:  # the ids are BedRegions
                    cells = [record_id.chrom, str(record_id.start), str(record_id.end), _tsv_field(record_id.id),
                             str(round(1000 * row.max())), record_id.strand] + cells
                else:
                    cells = [_tsv_field(record_id)] + cells
                stream.write("\t".join(cells) + "\n")
    return windowed


def _tsv_field(value) -> str:
    """A TSV cell: tabs and line breaks inside an id or class name (a CSV can quote them) written as \\t, \\n, \\r."""
    return str(value).replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _genomics_records(input: Path, bed: Path | None, split: str):
    """A function making the (id, sequence) stream while advancing a progress task, and the task's total (with a
    BED: (BedRegion, sequence))."""
    from genomics.data import is_fasta, iter_bed, iter_bed_regions, iter_fasta, load_sequences

    if bed is not None:
        total = sum(1 for _ in iter_bed(bed))

        def regions(progress, task):
            for record in iter_bed_regions(input, bed):
                yield record
                progress.advance(task)
        return regions, total
    if Path(input).is_file() and is_fasta(input):
        def fasta(progress, task):
            yield from iter_fasta(input, on_progress=lambda done: progress.update(task, completed=done))
        return fasta, Path(input).stat().st_size
    data = load_sequences(input, split=split)

    def table(progress, task):
        for record in zip(data.ids, data.sequences):
            yield record
            progress.advance(task)
    return table, len(data)


def _genomics_progress(quiet: bool):
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    from memorycore.training import stderr_console

    # transient: the bar vanishes when done, so where stderr is not a terminal it would leave only an empty line
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn(),
                    console=stderr_console(), disable=quiet or not sys.stderr.isatty(), transient=True)


# --------------------------------------------------------------------------------------------------------- lm commands
_LM = estimator_defaults(Path(__file__).resolve().parent / "memorycore" / "lm" / "estimator.py", "MemoryLM")
_LM_MODEL_OPTION = typer.Option(..., "--model", help="A model written by `lm fit`.")


@lm_app.callback()
def lm_main() -> None:
    """Train language models on text, generate and score text (memorycore.lm.MemoryLM)."""


@lm_app.command("fit")
@friendly_errors
def lm_fit(
    data: list[Path] = typer.Option(..., "--data", help="Text file(s) (repeat --data); the last 10% validates."),
    out: Path = typer.Option(Path("runs/lm/lm.safetensors"), help="Where to write the model (.safetensors)."),
    variant: str = typer.Option(_LM["variant"], help="mac, mag, mal, lmm, swa, attention (a plain transformer) "
                                                    "or ramnet."),
    tokenizer: str = typer.Option(_LM["tokenizer"], help="byte (256 ids) or bpe (trained on the training text)."),
    vocab_size: int = typer.Option(_LM["vocab_size"], help="BPE vocabulary size."),
    dim: int = typer.Option(_LM["dim"], help="Model width."),
    depth: int = typer.Option(_LM["depth"], help="Blocks."),
    block_size: int = typer.Option(_LM["block_size"], help="Tokens per training window."),
    batch_size: int = typer.Option(_LM["batch_size"], help="Windows per optimiser step."),
    steps: int = typer.Option(_LM["max_steps"], help="Optimiser steps."),
    eval_interval: int = typer.Option(_LM["eval_interval"], help="Steps between validation losses."),
    lr: float = typer.Option(_LM["lr"], help="Peak learning rate (AdamW, warm-up then cosine)."),
    dropout: float = typer.Option(_LM["dropout"], help="Dropout on every residual branch."),
    device: str = typer.Option(_LM["device"], help="auto, cpu, cuda or cuda:N."),
    seed: int = typer.Option(_LM["random_state"], help="Random seed."),
    threads: int = typer.Option(1, help="CPU threads for torch (1 suits small models on a shared machine)."),
    resume: bool = _RESUME_OPTION,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a language model on text files and save it (one .safetensors file, tokenizer included).

    Examples:

        python cli.py lm fit --data ../shared/datasets/tiny_shakespeare/input.txt --out lm.safetensors

        python cli.py lm fit --data input.txt --variant mac --tokenizer bpe --steps 2000 --out lm.safetensors

        python cli.py lm fit --data input.txt --out lm.safetensors --resume     # after an interrupted run
    """
    from memorycore.lm import MemoryLM

    _torch_threads(threads)
    _check_out(out, *data)
    model = MemoryLM(variant=variant, tokenizer=tokenizer, vocab_size=vocab_size, dim=dim, depth=depth,
                     block_size=block_size, batch_size=batch_size, max_steps=steps, eval_interval=eval_interval,
                     lr=lr, dropout=dropout, device=device, random_state=seed, verbose=not quiet)
    _fit_and_save(model, out, resume, data if len(data) > 1 else data[0])
    history = model.history_
    val = f", validation loss {min(history.val_loss):.4f} nats/token" if history.val_loss else ""
    typer.echo(f"saved {out}: {variant}, {model.n_parameters_ / 1e6:.2f}M parameters, {tokenizer} tokens "
               f"({model.tokenizer_.vocab_size}){val}, trained in {history.seconds / 60:.1f} min")


@lm_app.command("generate")
@friendly_errors
def lm_generate(
    model: Path = _LM_MODEL_OPTION,
    prompt: str = typer.Option("\n", help="Text to continue (printed first); default a newline."),
    tokens: int = typer.Option(500, help="Tokens to generate."),
    temperature: float = typer.Option(0.8, help="Sampling temperature; 0 = always the most likely token."),
    top_k: Optional[int] = typer.Option(None, help="Sample among the k most likely tokens only."),
    top_p: Optional[float] = typer.Option(None, help="Sample among the most likely tokens whose probability "
                                                     "reaches p (nucleus)."),
    seed: Optional[int] = typer.Option(None, help="Random seed (default: a fresh one)."),
    press: Optional[str] = typer.Option(
        None, help="Evict from the attention cache while reading the prompt and generating: h2o, l2 or "
                   "namm:<scorer file> (variants attention, swa, mac, mag, mal; docs/namm.md)."),
    budget: float = typer.Option(0.25, help="With --press h2o, l2 or a NAMM scorer evolved with a budget: the "
                                            "share of the cache kept, in (0, 1]."),
    interval: int = typer.Option(512, help="With --press: tokens between evictions (the prompt is read in pieces "
                                           "of it)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(1, help="CPU threads for torch."),
) -> None:
    """Continue a prompt, streaming the text to stdout as it is produced.

    Examples:

        python cli.py lm generate --model lm.safetensors --prompt "ROMEO:" --tokens 500

        python cli.py lm generate --model lm.safetensors --prompt "To be" --temperature 0.5 --top-k 20 --seed 1

        python cli.py lm generate --model lm.safetensors --prompt "ROMEO:" --press h2o --budget 0.25 --interval 64
    """
    from contextlib import nullcontext

    from memorycore.lm import MemoryLM

    _torch_threads(threads)
    language_model = MemoryLM.load(model, device=device)
    pressing = None if press is None else _namm_press(press, budget, interval, language_model, model)
    with nullcontext() if pressing is None else pressing(language_model):
        pieces = language_model.generate(prompt, tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                         seed=seed, stream=True)  # checks the prompt and settings before printing
        typer.echo(prompt, nl=False)
        for piece in pieces:
            typer.echo(piece, nl=False)
        typer.echo()
    if pressing is not None:
        typer.echo(_press_summary(press, pressing), err=True)


@lm_app.command("evaluate")
@friendly_errors
def lm_evaluate(
    model: Path = _LM_MODEL_OPTION,
    data: list[Path] = typer.Option(..., "--data", help="Text file(s) to score (repeat --data)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(1, help="CPU threads for torch."),
) -> None:
    """Print the loss (nats/token), bits per byte and perplexity of a model on text.

    Examples:

        python cli.py lm evaluate --model lm.safetensors --data valid.txt
    """
    from memorycore.lm import MemoryLM

    _torch_threads(threads)
    scores = MemoryLM.load(model, device=device).evaluate(data if len(data) > 1 else data[0])
    typer.echo(f"{', '.join(p.name for p in data)}: {scores['tokens']:,} tokens scored, loss {scores['loss']:.4f} "
               f"nats/token, {scores['bits_per_byte']:.4f} bits/byte, perplexity {scores['perplexity']:.2f}")


# ------------------------------------------------------------------------------------------------------- namm commands
namm_app = typer.Typer(help="Evict from language models' attention caches: evolve a NAMM scorer, compare presses "
                            "(docs/namm.md).", no_args_is_help=True)
lm_app.add_typer(namm_app, name="namm")
_NAMM_TASK_OPTION = typer.Option("passkey", help="passkey, needle, mk-niah (4 needles), mqar (needs a vocabulary "
                                                 "larger than --seq-len) or lm-loss (windows of --data).")
_NAMM_DATA_OPTION = typer.Option(None, "--data", help="Text file read by --task lm-loss.")
_NAMM_SEQ_LEN_OPTION = typer.Option(2048, help="Tokens per example.")
_NAMM_INTERVAL_OPTION = typer.Option(512, help="Tokens between evictions (NAMM: 512; use 32-64 on short contexts).")
_NAMM_TASK_VOCAB_OPTION = typer.Option(
    None, help="Token ids the retrieval tasks draw from (default: the model's vocabulary; bench/namm.py uses 64).")


@namm_app.callback()
def namm_main() -> None:
    """Evict from language models' attention caches: evolve a NAMM scorer, compare presses (docs/namm.md)."""


def _namm_press(spec: str, budget: float | None, interval: int, language_model, path: Path):
    """The press named by ``spec`` for a model read from ``path`` (None for full), its settings checked."""
    from memorycore.namm import make_press
    from memorycore.namm.evaluation import check_pressable
    from memorycore.namm.press import resolve_budget

    if budget is not None:
        resolve_budget(budget, None)
    check_pressable(language_model.network_, f"{path} (variant {language_model.variant})")
    return make_press(spec, budget=budget, interval=interval)


def _press_summary(spec: str, press) -> str:
    evictions = max((stats.applications for stats in press.stats.values()), default=0)
    if not evictions:
        return f"press {spec}: no eviction (the text stayed under one interval of {press.interval} tokens)"
    return (f"press {spec}: {evictions} evictions per layer; at the last, {press.kept_fraction():.0%} of the cached "
            "entries were kept")


def _namm_task(language_model, task: str, seq_len: int, data: Optional[Path], task_vocab: Optional[int]):
    from memorycore.lm.data import read_text
    from memorycore.namm.evaluation import make_task

    vocab = language_model.network_.vocab_size
    if task_vocab is not None and not 2 <= task_vocab <= vocab:
        raise InputError(f"--task-vocab must be in [2, {vocab}] (the model's vocabulary), got {task_vocab}")
    tokens = None
    if task == "lm-loss" and data is not None:
        tokens = language_model.tokenizer_.encode(read_text(data))
    elif data is not None:
        raise InputError(f"--data is read by --task lm-loss only; --task {task} draws its own examples")
    return make_task(task, seq_len=seq_len, vocab_size=task_vocab or vocab, tokens=tokens)


@namm_app.command("fit")
@friendly_errors
def namm_fit(
    model: Path = typer.Option(..., "--model", help="A model written by `lm fit` (a variant with attention)."),
    task: str = _NAMM_TASK_OPTION,
    data: Optional[Path] = _NAMM_DATA_OPTION,
    out: Path = typer.Option(Path("runs/lm/namm.safetensors"), help="Where to write the scorer (.safetensors)."),
    seq_len: int = _NAMM_SEQ_LEN_OPTION,
    interval: int = _NAMM_INTERVAL_OPTION,
    generations: int = typer.Option(50, help="CMA-ES generations."),
    population: int = typer.Option(32, help="Candidates per generation (NAMM: 32)."),
    sigma0: float = typer.Option(0.065, help="Initial step size (NAMM: 0.065)."),
    batch_size: int = typer.Option(8, help="Examples per generation, shared by its candidates."),
    budget: Optional[float] = typer.Option(
        None, help="Evolve a scorer that ranks the entries a press of this budget keeps, in (0, 1]; default: the "
                   "scorer decides what to keep (score >= 0), as NAMM."),
    hidden: int = typer.Option(32, help="Width of the BAM scorer (3585 parameters at 32)."),
    diagonal: bool = typer.Option(False, help="Diagonal covariance: linear time per generation."),
    task_vocab: Optional[int] = _NAMM_TASK_VOCAB_OPTION,
    seed: int = typer.Option(0, help="Seeds the candidates and the examples."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(1, help="CPU threads for torch."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed run of the same command from its "
                                                        "checkpoint (<out>.evolution.safetensors, written after "
                                                        "every generation and removed at the end)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress."),
) -> None:
    """Evolve a NAMM scorer for a language model by CMA-ES: fitness = task score with the pressed cache over the
    full cache's, on the same examples.

    Examples:

        python cli.py lm namm fit --model lm.safetensors --task passkey --out namm.safetensors

        python cli.py lm namm fit --model lm.safetensors --task lm-loss --data input.txt --seq-len 1024 --interval 64

        python cli.py lm namm fit --model lm.safetensors --task needle --budget 0.25 --out namm25.safetensors --resume
    """
    import time

    import torch

    from memorycore.devices import resolve_device
    from memorycore.lm import MemoryLM
    from memorycore.namm import BAMScorer, fit_namm
    from memorycore.namm.evaluation import check_pressable
    from memorycore.namm.press import resolve_budget

    _torch_threads(threads)
    if budget is not None:
        resolve_budget(budget, None)
    _check_out(out, model, data)
    language_model = MemoryLM.load(model, device=device)
    check_pressable(language_model.network_, f"{model} (variant {language_model.variant})")
    namm_task = _namm_task(language_model, task, seq_len, data, task_vocab)
    network = language_model.network_.to(resolve_device(device)).eval()
    full = namm_task.score(network, namm_task.sample(batch_size, torch.Generator().manual_seed(seed)))
    if not bool((torch.as_tensor(full) > 0).any()):
        raise InputError(f"{model} scores 0 on every {task} example with its full cache: there is nothing for a "
                         "press to keep; train the model on the task (bench/namm.py does) or pick another task")
    checkpoint = out.with_name(out.name.removesuffix(".safetensors") + ".evolution.safetensors")
    if not resume:
        checkpoint.unlink(missing_ok=True)
    start = time.perf_counter()
    result = fit_namm(network, namm_task, generations=generations, population=population, sigma0=sigma0,
                      batch_size=batch_size, scorer=BAMScorer(hidden), interval=interval, budget=budget,
                      diagonal=diagonal, seed=seed, checkpoint=checkpoint, out=out, verbose=not quiet)
    checkpoint.unlink(missing_ok=True)
    typer.echo(f"saved {out}: best fitness {result.best_fitness:.4f} (pressed / full-cache score) after "
               f"{len(result.history)} generations of {population}, in {(time.perf_counter() - start) / 60:.1f} min")


@namm_app.command("evaluate")
@friendly_errors
def namm_evaluate(
    model: Path = typer.Option(..., "--model", help="A model written by `lm fit` (a variant with attention)."),
    press: str = typer.Option("full,h2o,l2", help="Comma-separated presses: full, h2o, l2, namm:<scorer file>."),
    budget: float = typer.Option(0.25, help="Share of the cache h2o and l2 keep, in (0, 1]; also a NAMM scorer "
                                            "evolved with --budget (a scorer evolved without decides itself)."),
    task: str = _NAMM_TASK_OPTION,
    data: Optional[Path] = _NAMM_DATA_OPTION,
    seq_len: int = _NAMM_SEQ_LEN_OPTION,
    interval: int = _NAMM_INTERVAL_OPTION,
    examples: int = typer.Option(32, help="Held-out examples, the same for every press."),
    batch_size: int = typer.Option(8, help="Examples read at once."),
    decode_tokens: int = typer.Option(0, help="Also decode this many tokens after one example (decoding tokens/s)."),
    task_vocab: Optional[int] = _NAMM_TASK_VOCAB_OPTION,
    seed: int = typer.Option(1, help="Seeds the examples (fit draws with --seed 0 and its generations)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    threads: int = typer.Option(1, help="CPU threads for torch."),
) -> None:
    """Compare presses on the same examples: score, the share of the cache each ends with, tokens/s.

    Every press reads the examples in pieces of --interval tokens (the full cache too).

    Examples:

        python cli.py lm namm evaluate --model lm.safetensors --press namm:namm.safetensors,h2o,l2,full --budget 0.25

        python cli.py lm namm evaluate --model lm.safetensors --task lm-loss --data valid.txt --interval 64
    """
    from memorycore.devices import resolve_device
    from memorycore.lm import MemoryLM
    from memorycore.namm.evaluation import compare_presses

    _torch_threads(threads)
    for name, value in (("--examples", examples), ("--batch-size", batch_size), ("--interval", interval)):
        if value < 1:
            raise InputError(f"{name} must be >= 1, got {value}")
    if decode_tokens < 0:
        raise InputError(f"--decode-tokens must be >= 0, got {decode_tokens}")
    language_model = MemoryLM.load(model, device=device)
    specs = [spec.strip() for spec in press.split(",") if spec.strip()]
    if not specs:
        raise InputError("--press names no press; give e.g. full,h2o,l2,namm:namm.safetensors")
    presses = {spec: _namm_press(spec, budget, interval, language_model, model) for spec in specs}
    namm_task = _namm_task(language_model, task, seq_len, data, task_vocab)
    network = language_model.network_.to(resolve_device(device)).eval()
    results = compare_presses(network, namm_task, presses, interval=interval, examples=examples,
                              batch_size=batch_size, seed=seed, decode_tokens=decode_tokens)
    score = "exp(-loss)" if task == "lm-loss" else "answer tokens right"
    width = max(len("press"), *map(len, specs)) + 2
    typer.echo(f"{model.name}: {task}, {examples} examples of {seq_len} tokens, interval {interval}, budget "
               f"{budget:g}")
    header = f"{'press':<{width}}{'score':>10}{'cache kept':>12}{'tokens/s':>10}"
    typer.echo(header + (f"{'decode/s':>10}" if decode_tokens else ""))
    for result in results:
        line = f"{result.name:<{width}}{result.score:>10.4f}{result.kept:>12.1%}{result.tokens_per_second:>10.0f}"
        typer.echo(line + (f"{result.decode_tokens_per_second:>10.1f}" if decode_tokens else ""))
    typer.echo(f"score: {score} (higher is better); cache kept: entries at the end over the full cache's")


@bench_app.callback()
def bench_main() -> None:
    """Run the benchmark scripts of bench/ (add --quick for a short CPU run)."""


BENCH_DIR = Path(__file__).resolve().parent / "bench"


def _bench_scripts() -> dict[str, Path]:
    return {path.stem: path for path in sorted(BENCH_DIR.glob("*.py")) if not path.name.startswith("_")}


@bench_app.command("list")
def bench_list() -> None:
    """List the benchmark scripts.

    Example: python cli.py bench list
    """
    scripts = _bench_scripts()
    width = max(map(len, scripts), default=0)
    for name, path in scripts.items():
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip().splitlines()
        typer.echo(f"{name:<{width}}  {doc[0] if doc else ''}")


# --help is not an option of `bench run` itself, so that after a script's name it reaches the script
@bench_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                            "help_option_names": []})
@friendly_errors
def bench_run(ctx: typer.Context,
              name: str = typer.Argument(None, help="script name from `bench list`", show_default=False)) -> None:
    """Run one benchmark script; further arguments go to the script.

    Examples: python cli.py bench run neural_memory --quick
              python cli.py bench run neural_memory --help
    """
    if name in (None, "--help", "-h"):
        typer.echo(ctx.get_help())
        raise typer.Exit()
    scripts = _bench_scripts()
    if name not in scripts:
        raise InputError(f"no benchmark named {name!r}; choose one of: {', '.join(scripts) or '(none found)'}")
    saved = sys.argv
    sys.argv = [str(scripts[name]), *ctx.args]
    try:
        runpy.run_path(str(scripts[name]), run_name="__main__")
    finally:
        sys.argv = saved


def _print_version(value: bool) -> None:
    if value:
        from memorycore import __version__

        typer.echo(f"memorycore {__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """Test-time-learning memory: forecasting, DNA classification and benchmarks."""


if __name__ == "__main__":
    sys.exit(app())
