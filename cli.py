"""memorycore command line: ``python cli.py ...`` or ``memorycore ...``.

Thin by design: parse the arguments, call the library, print. Results go to stdout or ``--out``; logs and progress
bars go to stderr. Bad input ends with one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import ast
import functools
import runpy
import sys
from pathlib import Path
from typing import Callable, TypeVar

import typer

from memorycore.errors import InputError, MemorycoreError

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


BENCH_DIR = Path(__file__).resolve().parent / "bench"


def _bench_scripts() -> dict[str, Path]:
    return {path.stem: path for path in sorted(BENCH_DIR.glob("*.py")) if not path.name.startswith("_")}


@bench_app.command("list")
def bench_list() -> None:
    """List the benchmark scripts.

    Example: python cli.py bench list
    """
    for name, path in _bench_scripts().items():
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").strip().splitlines()
        typer.echo(f"{name:<20} {doc[0] if doc else ''}")


@bench_app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@friendly_errors
def bench_run(ctx: typer.Context, name: str = typer.Argument(..., help="script name from `bench list`")) -> None:
    """Run one benchmark script; further arguments go to the script.

    Examples: python cli.py bench run neural_memory --quick
              python cli.py bench run neural_memory --help
    """
    scripts = _bench_scripts()
    if name not in scripts:
        raise InputError(f"no benchmark named {name!r}; choose one of: {', '.join(scripts) or '(none found)'}")
    saved = sys.argv
    sys.argv = [str(scripts[name]), *ctx.args]
    try:
        runpy.run_path(str(scripts[name]), run_name="__main__")
    finally:
        sys.argv = saved


if __name__ == "__main__":
    sys.exit(app())
