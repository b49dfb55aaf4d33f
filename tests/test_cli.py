"""The command line's skeleton: --help works at every level."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app

ROOT = Path(__file__).resolve().parents[1]

runner = CliRunner()


@pytest.mark.parametrize("args", [[], ["forecast"], ["genomics"], ["bench"]])
def test_help_at_every_level(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bench_list_names_the_scripts():
    result = runner.invoke(app, ["bench", "list"])
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.splitlines() if line.strip()}
    scripts = {path.stem for path in (ROOT / "bench").glob("*.py") if not path.name.startswith("_")}
    assert scripts <= listed, f"missing from bench list: {sorted(scripts - listed)}"


def test_unknown_bench_is_one_clear_line():
    result = runner.invoke(app, ["bench", "run", "no_such_bench"])
    assert result.exit_code == 2
    assert "no benchmark named 'no_such_bench'" in result.output
    assert "Traceback" not in result.output


def test_help_after_a_bench_name_is_the_scripts_own():
    own = runner.invoke(app, ["bench", "run", "--help"])
    assert own.exit_code == 0 and "further arguments go to the script" in own.output
    script = runner.invoke(app, ["bench", "run", "mqar", "--help"])
    assert script.exit_code == 0, script.output
    assert "--slots-exponent" in script.output  # argparse's usage of bench/mqar.py, not the command's help
