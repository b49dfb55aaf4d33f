"""memorycore command line: ``python cli.py ...`` or ``memorycore ...``.

Thin by design: parse the arguments, call the library, print. Results go to stdout or ``--out``; logs and progress
bars go to stderr. Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

import typer

from memorycore.errors import MemorycoreError

app = typer.Typer(
    help="Test-time-learning memory: forecasting, DNA classification, language models and benchmarks.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
forecast_app = typer.Typer(help="Forecast multivariate time series (ETT, ECL, Traffic, Weather or your CSV).",
                           no_args_is_help=True)
genomics_app = typer.Typer(help="Classify DNA sequences (GenomicBenchmarks folders, CSV/TSV, FASTA, FASTA + BED).",
                           no_args_is_help=True)
lm_app = typer.Typer(help="Train small language models with memory layers on text, and generate.", no_args_is_help=True)
bench_app = typer.Typer(help="Run the benchmark scripts of bench/.", no_args_is_help=True)
app.add_typer(forecast_app, name="forecast")
app.add_typer(genomics_app, name="genomics")
app.add_typer(lm_app, name="lm")
app.add_typer(bench_app, name="bench")

F = TypeVar("F", bound=Callable)


def friendly_errors(command: F) -> F:
    """Turn the library's input errors into one line on stderr and exit code 2."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except (MemorycoreError, FileNotFoundError) as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(code=2) from None

    return wrapper


@forecast_app.callback()
def forecast_main() -> None:
    """Forecast multivariate time series (ETT, ECL, Traffic, Weather or your CSV)."""


@genomics_app.callback()
def genomics_main() -> None:
    """Classify DNA sequences (GenomicBenchmarks folders, CSV/TSV, FASTA, FASTA + BED)."""


@lm_app.callback()
def lm_main() -> None:
    """Train small language models with memory layers on text, and generate."""


@bench_app.callback()
def bench_main() -> None:
    """Run the benchmark scripts of bench/ (add --quick for a short CPU run)."""


if __name__ == "__main__":
    sys.exit(app())
